"""Operator settings reach the parts they configure."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from blockpress.runtime.cli.embedded import replica_options
from blockpress.runtime.config import RuntimeSettings


def test_replica_settings_reach_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKPRESS_REPLICA_TORCH_THREADS", "3")
    monkeypatch.setenv("BLOCKPRESS_AGENT_PIN", "blockpress.workers.agent_model:pin_tool_call_skeleton")
    options = replica_options(RuntimeSettings())
    assert options["torch_threads"] == 3
    assert options["agent_pin"] == "blockpress.workers.agent_model:pin_tool_call_skeleton"
    assert replica_options(RuntimeSettings.model_validate({}))["max_sessions"] == 8


def test_an_agent_pin_must_name_a_function() -> None:
    with pytest.raises(ValidationError, match="agent_pin"):
        RuntimeSettings(agent_pin="not a function")


def test_quantization_reaches_the_replicas_and_the_reported_precision() -> None:
    from blockpress.runtime.cli.embedded import served_precision
    from blockpress.runtime.cli.main import _parser, _settings

    settings = _settings(_parser().parse_args(["serve", "--quantization", "fp8"]))
    assert settings.quantization == "fp8"
    assert replica_options(settings)["quantization"] == "fp8"
    assert served_precision(settings) == "fp8"
    assert served_precision(RuntimeSettings()) is None  # the checkpoint's dtype is reported then
    mixed = RuntimeSettings(node_kinds={"dgx-spark": {"quantization": "nf4"}, "rtx-pro": {"quantization": "fp8"}})
    assert served_precision(mixed) == "nf4 on dgx-spark, fp8 on rtx-pro"
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--quantization", "int3"])


def test_a_model_card_reports_what_the_replicas_run(tmp_path: Path) -> None:
    from blockpress.runtime.gateway.cards import load_model_card
    from blockpress.workers.testing import build_tiny_checkpoint

    path = str(build_tiny_checkpoint(tmp_path / "tiny"))
    assert load_model_card(path).precision == load_model_card(path).dtype
    assert load_model_card(path, precision="nf4").precision == "nf4"
