"""A claim: one delivery of a job to a replica, the token every write of that run carries."""

from __future__ import annotations

from dataclasses import dataclass

from blockpress.runtime.contracts.jobs import JobSpec

__all__ = ["Claim"]


@dataclass(frozen=True, slots=True)
class Claim:
    """One delivery of a job to a replica that is allowed to run it; pass it back to every write."""

    spec: JobSpec
    entry_id: str
    """The job's id in the model stream."""
    consumer: str
    """The replica that holds the lease."""
    attempt: int
    deliveries: int
    previous_error: dict[str, str] | None
    """The last attempt's error when this is a retry (e.g. WORKER_LOST after a crash)."""
    claimed_at: float

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def model(self) -> str:
        return self.spec.model
