"""Operator settings reach the parts they configure."""

from __future__ import annotations

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
