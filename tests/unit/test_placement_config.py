"""Per-kind engine options, placement and autoscaling bounds reach the pool from the settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from blockpress.runtime.cli.embedded import model_placement, replica_options, scale_policy
from blockpress.runtime.cli.main import _parser, _settings
from blockpress.runtime.config import RuntimeSettings


def test_node_kinds_and_placement_come_from_json_in_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    kinds = '{"dgx-spark": {"quantization": "nf4"}, "rtx-pro": {"dtype": "bfloat16"}}'
    monkeypatch.setenv("BLOCKPRESS_NODE_KINDS", kinds)
    monkeypatch.setenv("BLOCKPRESS_PLACEMENT", '{"big": ["rtx-pro"], "*": ["rtx-pro", "dgx-spark"]}')
    monkeypatch.setenv("BLOCKPRESS_REPLICA_NUM_GPUS", "1")
    settings = RuntimeSettings()
    options = replica_options(settings)
    # Only what an entry names: the rest falls back to the replica's device and dtype.
    assert options["node_kinds"] == {"dgx-spark": {"quantization": "nf4"}, "rtx-pro": {"dtype": "bfloat16"}}
    assert options["num_gpus"] == 1
    (tmp_path / "big").mkdir()  # a checkpoint directory's model name is its last part
    assert model_placement(settings, str(tmp_path / "big")) == ("rtx-pro",)
    assert model_placement(settings, "org/other") == ("rtx-pro", "dgx-spark")
    monkeypatch.delenv("BLOCKPRESS_PLACEMENT")
    assert model_placement(RuntimeSettings(), str(tmp_path / "big")) == ()  # no entry: any node


def test_a_node_kind_names_a_known_precision() -> None:
    with pytest.raises(ValidationError, match="quantization"):
        RuntimeSettings(node_kinds={"x": {"quantization": "int3"}})
    with pytest.raises(ValidationError, match="extra"):
        RuntimeSettings(node_kinds={"x": {"precision": "fp8"}})


def test_autoscaling_is_on_only_with_a_maximum() -> None:
    assert scale_policy(RuntimeSettings(replicas=2)) is None
    policy = scale_policy(RuntimeSettings(replicas=2, max_replicas=6, scale_max_wait_s=3))
    assert (policy.min_replicas, policy.max_replicas, policy.max_wait_s) == (2, 6, 3)
    policy = scale_policy(RuntimeSettings(replicas=2, min_replicas=0, max_replicas=6))
    assert policy.min_replicas == 0


def test_the_replicas_command_takes_autoscaling_flags() -> None:
    args = _parser().parse_args(
        ["replicas", "--ray-address", "auto", "--min-replicas", "1", "--max-replicas", "4", "--metrics-port", "9466"]
    )
    settings = _settings(args)
    assert (settings.min_replicas, settings.max_replicas, settings.pool_metrics_port) == (1, 4, 9466)
    assert settings.ray_address == "auto"
