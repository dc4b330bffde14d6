"""The agent ledger in Redis: turn records of one job, fenced by the job's attempt number.

    <job key>:ledger    hash    turn number -> turn record (JSON); expires with `ttl_s`

A write succeeds only while the job record's `attempt` is this attempt's, checked in one script,
so a replica that lost its lease (and whose job was redelivered) cannot record a turn, and, since
the loop records a tool call before running it, cannot run the tool either.
"""

from __future__ import annotations

import threading
from typing import Any

import redis

from blockpress.agents.errors import Superseded
from blockpress.agents.ledger import Ledger
from blockpress.runtime.contracts.jobs import dumps, loads
from blockpress.runtime.contracts.keys import JobField, Keys

__all__ = ["RedisLedger"]

# One synchronous client (a connection pool) per Redis URL, shared by the jobs of a replica.
_clients: dict[str, redis.Redis] = {}
_clients_lock = threading.Lock()

_FENCED_PUT = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 1
"""


class RedisLedger(Ledger):
    """A job's turn records for the attempt `attempt`, through a synchronous Redis client.

    Synchronous because the agent loop runs on the engine's thread, not on the replica's event loop.
    """

    def __init__(
        self,
        client: redis.Redis,
        job_id: str,
        attempt: int,
        *,
        keys: Keys | None = None,
        ttl_s: int = 7 * 86400,
    ) -> None:
        self._redis = client
        self._keys = keys or Keys()
        self._job_key = self._keys.job(job_id)
        self._key = self._keys.ledger(job_id)
        self._attempt = str(attempt)
        self._ttl_s = ttl_s
        self._put = client.register_script(_FENCED_PUT)

    @classmethod
    def from_url(cls, url: str, job_id: str, attempt: int, **kwargs: Any) -> RedisLedger:
        """A ledger on a client shared by every job of this process that uses the same `url`."""
        with _clients_lock:
            client = _clients.get(url)
            if client is None:
                client = _clients[url] = redis.Redis.from_url(url)
        return cls(client, job_id, attempt, **kwargs)

    def get(self, turn: int) -> dict[str, Any] | None:
        record = loads(self._redis.hget(self._key, str(turn)))
        return dict(record) if record is not None else None

    def put(self, turn: int, record: dict[str, Any]) -> None:
        """Stores the record if this attempt still owns the job.

        Raises:
            Superseded: the job's attempt moved on (or the job record is gone).
        """
        args: list[str | int] = [JobField.ATTEMPT, self._attempt, str(turn), dumps(record), self._ttl_s]
        if not self._put(keys=[self._job_key, self._key], args=args):
            raise Superseded(f"{self._job_key}: attempt {self._attempt} no longer owns this job")
