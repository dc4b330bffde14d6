"""The job queue on Redis streams: submit, claim with a lease, events, final states, dead letters.

The state changes are atomic Lua scripts (`lua/`), fenced by the attempt number.
"""

from blockpress.runtime.queue.jobqueue import Claim, JobQueue

__all__ = ["Claim", "JobQueue"]
