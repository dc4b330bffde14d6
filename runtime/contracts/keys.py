"""Every Redis key and consumer-group name BlockPress uses, in one place.

    bp:job:<job_id>            hash     the job record (fields below); TTL once final
    bp:job:<job_id>:events     stream   the job's events; TTL once final
    bp:job:<job_id>:ledger     hash     an agent job's turn records (blockpress.workers.ledger)
    bp:queue:<model>           stream   jobs waiting for a replica of <model>; consumer group `replicas`
    bp:queued:<model>          zset     job ids still QUEUED, scored by submission time (depth, oldest age)
    bp:deadlines:<model>       zset     QUEUED job ids with a deadline, scored by it (expiry sweep)
    bp:dead:<model>            stream   dead-lettered jobs with their last error
    bp:replicas:<model>        hash     replica id -> last heartbeat (epoch seconds), for health checks
    bp:traces:...              the trace store's keys (blockpress.runtime.tracing.store, its own layout)

A deployment shares one Redis between several BlockPress installs by choosing another `prefix`.
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
    """Key names under one prefix."""

    prefix: str = "bp"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def ledger(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:ledger"

    def queue(self, model: str) -> str:
        return f"{self.prefix}:queue:{model}"

    def queued(self, model: str) -> str:
        return f"{self.prefix}:queued:{model}"

    def deadlines(self, model: str) -> str:
        return f"{self.prefix}:deadlines:{model}"

    def dead_letter(self, model: str) -> str:
        return f"{self.prefix}:dead:{model}"

    def replicas(self, model: str) -> str:
        return f"{self.prefix}:replicas:{model}"
