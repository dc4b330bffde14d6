"""The span vocabulary every part of the runtime shares: span names and attribute keys.

Its own module so that the trace store, the views and the engine wrapper use it without importing the
OpenTelemetry setup (which in turn imports the store).
"""

from __future__ import annotations

from typing import Final

__all__ = ["Attr", "SpanName"]


class SpanName:
    """Span names shared by every part of the runtime (docs/CONTRACTS.md, "Spans")."""

    QUEUE_WAIT: Final = "queue.wait"
    REPLICA_RUN: Final = "replica.run"
    ENGINE_PREFILL: Final = "engine.prefill"
    ENGINE_CANVAS: Final = "engine.canvas"
    ENGINE_COMMIT: Final = "engine.commit"
    """Encoding a finished canvas into the KV cache, before the next canvas's first step."""
    AGENT_TURN: Final = "agent.turn"
    AGENT_TOOL: Final = "agent.tool"
    STEP_EVENT: Final = "step"
    """The span event recorded on `engine.canvas` once per denoising step."""

    @staticmethod
    def gateway(method: str) -> str:
        """`gateway.Submit`, `gateway.Generate`, ...: one span per gRPC call, named after the method."""
        return f"gateway.{method}"


class Attr:
    """Attribute keys: OpenTelemetry semantic conventions where one exists, `blockpress.*` otherwise."""

    # rpc.* on gateway spans.
    RPC_SYSTEM: Final = "rpc.system"
    RPC_SERVICE: Final = "rpc.service"
    RPC_METHOD: Final = "rpc.method"
    RPC_GRPC_STATUS_CODE: Final = "rpc.grpc.status_code"
    # gen_ai.* wherever a model or a tool is involved.
    GEN_AI_SYSTEM: Final = "gen_ai.system"
    GEN_AI_OPERATION: Final = "gen_ai.operation.name"
    GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
    GEN_AI_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
    GEN_AI_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
    GEN_AI_TOOL_NAME: Final = "gen_ai.tool.name"
    GEN_AI_TOOL_CALL_ID: Final = "gen_ai.tool.call.id"
    # The job, present on every span that knows it; the trace store indexes traces by it.
    JOB_ID: Final = "blockpress.job.id"
    JOB_KIND: Final = "blockpress.job.kind"
    JOB_ATTEMPT: Final = "blockpress.job.attempt"
    JOB_STATE: Final = "blockpress.job.state"
    REPLICA: Final = "blockpress.replica"
    PREFILL_TOKENS: Final = "blockpress.prefill.tokens"
    """Prompt tokens the encoder actually ran (fewer than the prompt on a warm session)."""
    CANVAS_INDEX: Final = "blockpress.canvas.index"
    """The canvas's place in the job, counted over all its generations (the gRPC `Canvas.index`);
    on `engine.commit`, the canvas being committed."""
    CANVAS_GENERATION_INDEX: Final = "blockpress.canvas.generation_index"
    """Its place within one generation (an agent turn), as the engine counts."""
    CANVAS_DENOISE_MS: Final = "blockpress.canvas.denoise_ms"
    """The engine's time in the canvas's steps; the span's duration less this is the consumer's."""
    CANVAS_STEPS: Final = "blockpress.canvas.steps"
    CANVAS_MAX_STEPS: Final = "blockpress.canvas.max_steps"
    CANVAS_TOKENS: Final = "blockpress.canvas.tokens"
    CANVAS_MEAN_ENTROPY: Final = "blockpress.canvas.mean_entropy"
    STOP_REASON: Final = "blockpress.stop_reason"
    TURN_INDEX: Final = "blockpress.agent.turn"
    TOOL_OUTCOME: Final = "blockpress.tool.outcome"
    """`ok` or `error` on `agent.tool` spans."""
    # Attributes of the per-step span event.
    STEP: Final = "step"
    STEP_MS: Final = "step_ms"
    DECODER_MS: Final = "decoder_ms"
    """The decoder forward's part of the step (embedding through the output head)."""
    SAMPLER_MS: Final = "sampler_ms"
    """The rest of the step: sampler, acceptance, renoising and the stop test."""
    ACCEPTED: Final = "accepted"
    MEAN_ENTROPY: Final = "mean_entropy"
