"""Fixtures of the HTTP front's tests: the real engine on the shipped tiny checkpoint, and the service
around it (`httpservice.py`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from httpservice import Service, running

from blockpress.runtime.gateway.cards import ModelCard, load_model_card
from blockpress.workers.checkpoints import TINY_CALCULATOR
from blockpress.workers.engine import DiffusionEngine


@pytest.fixture(scope="session")
def tiny_engine() -> DiffusionEngine:
    """The real engine on the shipped, trained tiny checkpoint."""
    return DiffusionEngine.from_pretrained(str(TINY_CALCULATOR), device="cpu")


@pytest.fixture(scope="session")
def tiny_card() -> ModelCard:
    return load_model_card(str(TINY_CALCULATOR))


@pytest.fixture
async def service(redis_client: Any, tiny_engine: DiffusionEngine, tiny_card: ModelCard) -> AsyncIterator[Service]:
    async with running(redis_client, tiny_engine, tiny_card) as svc:
        yield svc
