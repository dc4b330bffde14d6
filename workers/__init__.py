"""BlockPress workers: the DiffusionGemma engine and the replicas that run it.

The engine's names load lazily, so that the seam (`Engine`), the fake engine (`FakeEngine`) and the
errors import without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blockpress.runtime.contracts.settings import DenoiseSettings
from blockpress.workers.errors import EngineError, GenerationCancelled, InvalidRequest, InvalidSettings, PromptTooLong

if TYPE_CHECKING:
    from blockpress.workers.engine import DiffusionEngine
    from blockpress.workers.protocol import Engine
    from blockpress.workers.session import EngineSession
    from blockpress.workers.testing import FakeEngine
    from blockpress.workers.types import CanvasEvent, CanvasStats, DraftEvent, EndEvent, GenerationResult

__all__ = [
    "CanvasEvent",
    "CanvasStats",
    "DenoiseSettings",
    "DiffusionEngine",
    "DraftEvent",
    "EndEvent",
    "Engine",
    "EngineError",
    "EngineSession",
    "FakeEngine",
    "GenerationCancelled",
    "GenerationResult",
    "InvalidRequest",
    "InvalidSettings",
    "PromptTooLong",
]

_LAZY = {
    "DiffusionEngine": ".engine",
    "Engine": ".protocol",
    "FakeEngine": ".testing",
    "EngineSession": ".session",
    "CanvasEvent": ".types",
    "CanvasStats": ".types",
    "DraftEvent": ".types",
    "EndEvent": ".types",
    "GenerationResult": ".types",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
