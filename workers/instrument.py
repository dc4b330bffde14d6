"""What a job leaves behind besides its events: its `queue.wait` and `replica.run` spans and metrics.

The engine's own spans come from `TracedEngine`; these are the job's, opened by the runner around the
whole run so that the engine's spans parent on `replica.run`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from opentelemetry import context as otel_context
from opentelemetry import trace

from blockpress.runtime.metrics import get_metrics
from blockpress.runtime.queue.jobqueue import Claim
from blockpress.runtime.tracing.names import Attr, SpanName
from blockpress.runtime.tracing.telemetry import extract_context, get_tracer, job_context, record_queue_wait
from blockpress.workers.outcome import Ending

__all__ = ["describe", "record_metrics", "replica_span"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def replica_span(claim: Claim) -> Iterator[trace.Span]:
    """Yields the job's current `replica.run` span, then records the delivery's `queue.wait` span.

    The wait's times are known at the claim already; it is recorded after the run so that building it
    is not on the way from the claim to the engine's first step.
    """
    spec = claim.spec
    attributes = {
        Attr.JOB_ID: spec.job_id,
        Attr.JOB_KIND: spec.kind,
        Attr.JOB_ATTEMPT: claim.attempt,
        Attr.REPLICA: claim.consumer,
        Attr.GEN_AI_REQUEST_MODEL: spec.model,
    }
    # Attached rather than passed as the span's parent context: the span becomes current on top of the
    # current context, and the job's canvas counter must be in it for every span opened below.
    token = otel_context.attach(job_context(extract_context(spec.trace_context)))
    try:
        with get_tracer().start_as_current_span(
            SpanName.REPLICA_RUN, kind=trace.SpanKind.CONSUMER, attributes=attributes
        ) as span:
            yield span
    finally:
        otel_context.detach(token)
        record_queue_wait(
            job_id=spec.job_id,
            model=spec.model,
            submitted_at=spec.submitted_at,
            trace_context=spec.trace_context,
            attempt=claim.attempt,
            started_at=claim.claimed_at,
        )


def describe(span: trace.Span, ending: Ending) -> None:
    """The job's end on its `replica.run` span: final state, stop reason, token counts."""
    if ending.state is None:  # not ours: the newer attempt's span tells the end
        return
    span.set_attribute(Attr.JOB_STATE, ending.state.value)
    if ending.result is not None:
        usage = ending.result.get("usage") or {}
        span.set_attribute(Attr.GEN_AI_INPUT_TOKENS, int(usage.get("prompt_tokens", 0)))
        span.set_attribute(Attr.GEN_AI_OUTPUT_TOKENS, int(usage.get("completion_tokens", 0)))
        span.set_attribute(Attr.STOP_REASON, str(ending.result.get("stop_reason", "")))


def record_metrics(model: str, claim: Claim, ending: Ending) -> None:
    """Counts the final state and, for a generation, its speed; metrics never fail a job."""
    if ending.state is None:
        return
    try:
        metrics = get_metrics()
        metrics.job_finished(model, ending.state.value)
        if ending.generation is not None:
            queued_s = max(0.0, claim.claimed_at - claim.spec.submitted_at)
            metrics.observe_generation(model, ending.generation, queued_s=queued_s)
    except Exception:
        log.exception("job %s: recording metrics failed", claim.job_id)
