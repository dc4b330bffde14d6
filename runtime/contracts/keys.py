"""Every Redis key and consumer-group name BlockPress uses, in one place.

    {bp}:job:<job_id>          hash     the job record (fields below); TTL once final
    {bp}:events:<job_id>       stream   the job's events; TTL once final
    {bp}:ledger:<job_id>       hash     an agent job's turn records (blockpress.workers.ledger)
    {bp}:queue:<model>         stream   jobs waiting for a replica of <model>; consumer group `replicas`
    {bp}:queued:<model>        zset     job ids still QUEUED, scored by submission time (depth, oldest age)
    {bp}:deadlines:<model>     zset     QUEUED job ids with a deadline, scored by it (expiry sweep)
    {bp}:dead:<model>          stream   dead-lettered jobs with their last error
    {bp}:replicas:<model>      hash     replica id -> last heartbeat (epoch seconds), for health checks
    bp:traces:...              the trace store's keys (blockpress.runtime.tracing.store, its own layout)

Why the layout is safe against client-chosen ids: the kind of a key comes before the id and the id
is always the last segment, so `<kind>:<id>` names one key for one (kind, id) pair whatever bytes
the id holds (`P1:events` is the job record `{bp}:job:P1:events`, never the event stream of `P1`,
which is `{bp}:events:P1`). Model names sit in the same last place. The gateway also restricts ids
to a small alphabet; this layout does not rely on it.

Why `{bp}` is a hash tag: every queue script touches the keys of one job and of its model at once,
and Redis Cluster (and managed Redis in cluster mode) runs a script only on keys of one slot. The
tag puts all keys of one install in one slot; several installs shard by choosing other prefixes.

A deployment shares one Redis between several BlockPress installs by choosing another `prefix`.
Keys written by versions before the hash tag (`bp:job:<id>` ...) are not read any more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["GROUP", "JobField", "Keys"]

GROUP: Final = "replicas"
"""The consumer group on every model stream; each replica is one consumer in it."""


class JobField:
    """Field names of the job hash. Lua scripts use the same literal names."""

    SPEC: Final = "spec"
    MODEL: Final = "model"
    STATE: Final = "state"
    ATTEMPT: Final = "attempt"
    DELIVERIES: Final = "deliveries"
    REPLICA: Final = "replica"
    RESULT: Final = "result"
    ERROR: Final = "error"
    CANCEL: Final = "cancel"
    ENTRY: Final = "entry"
    """The job's id in its model stream, so that cancel and finish can XACK/XDEL it."""
    DEADLINE: Final = "deadline"
    SUBMITTED_AT: Final = "submitted_at"
    STARTED_AT: Final = "started_at"
    FINISHED_AT: Final = "finished_at"


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix.

    Args:
        prefix: the install's name in Redis; it becomes the hash tag `{prefix}`, so it must not
            contain `{` or `}`.
    """

    prefix: str = "bp"

    def __post_init__(self) -> None:
        if not self.prefix or "{" in self.prefix or "}" in self.prefix:
            raise ValueError(f"key prefix must be non-empty and free of braces, got {self.prefix!r}")

    def _key(self, kind: str, name: str) -> str:
        return f"{{{self.prefix}}}:{kind}:{name}"

    def job(self, job_id: str) -> str:
        return self._key("job", job_id)

    def events(self, job_id: str) -> str:
        return self._key("events", job_id)

    def ledger(self, job_id: str) -> str:
        return self._key("ledger", job_id)

    def queue(self, model: str) -> str:
        return self._key("queue", model)

    def queued(self, model: str) -> str:
        return self._key("queued", model)

    def deadlines(self, model: str) -> str:
        return self._key("deadlines", model)

    def dead_letter(self, model: str) -> str:
        return self._key("dead", model)

    def replicas(self, model: str) -> str:
        return self._key("replicas", model)
