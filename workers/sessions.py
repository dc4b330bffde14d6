"""`SessionCache`: engine sessions (KV caches) kept between the jobs of one client conversation."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from blockpress.workers.protocol import Session

__all__ = ["SessionCache"]

log = logging.getLogger(__name__)


class SessionCache:
    """Engine sessions by `session_id`, least recently used dropped beyond `size`.

    Args:
        size: sessions kept; each holds a conversation's cache in the engine's memory. 0 keeps none.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def get(self, key: str, new: Callable[[], Session]) -> Session:
        """The session of `key`, made by `new` when there is none; it becomes the most recently used."""
        session = self._sessions.pop(key, None)
        if session is None:
            session = new()
        if self.size > 0:
            self._sessions[key] = session
            while len(self._sessions) > self.size:
                dropped, _ = self._sessions.popitem(last=False)
                log.debug("session %s dropped (least recently used of %d)", dropped, self.size)
        return session

    def drop(self, key: str) -> None:
        """Forgets `key`'s session (a generation that did not finish may have left it half-written)."""
        self._sessions.pop(key, None)

    def keys(self) -> list[str]:
        """Session ids held, least recently used first."""
        return list(self._sessions)
