"""`FaultInjector`: the one way into a replica's job loop for fault tests.

A runner built without one (every production replica) makes no fault checks at all: nothing a request
carries can reach a test hook. Fault tests install one through `ReplicaPool(..., faults=...)`, which
Ray hands to each replica's constructor, so the injector must be importable there (the shipped one is
`blockpress.workers.testing.PromptFaults`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blockpress.runtime.queue.jobqueue import Claim, JobQueue
    from blockpress.workers.outcome import Ending

__all__ = ["FaultInjector"]


class FaultInjector:
    """Hooks the job runner calls at its fault points; each does nothing unless a subclass says so."""

    def job_started(self, claim: Claim) -> None:
        """Called on the job's worker thread after the claim and before the engine runs.

        Args:
            claim: the delivery being run (its spec and attempt number).
        """

    async def before_finish(self, claim: Claim, queue: JobQueue, ending: Ending) -> None:
        """Called once the job's end is known, before `JobQueue.finish` writes it and acknowledges.

        Args:
            claim: the delivery being run.
            queue: the runner's queue, for an injector that writes part of the end itself.
            ending: the final state and payload the runner is about to write.
        """
