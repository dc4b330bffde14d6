"""Test doubles of the workers: tiny checkpoints of the real class, a fake engine, fault injection.

Real weights cannot be downloaded where BlockPress is built, and the cost of a step does not depend on
what the weights are; what an engine test needs is the real architecture, a tokenizer and the chat
template (`build_tiny_checkpoint`). A test of the job loop needs no model at all: `FakeEngine` is an
`Engine` without torch. `PromptFaults` is the fault injector the fault tests install in a replica.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockpress.runtime.contracts.settings import DenoiseSettings
from blockpress.workers.checkpoints import TINY_CALCULATOR
from blockpress.workers.errors import GenerationCancelled, InvalidRequest
from blockpress.workers.faults import FaultInjector
from blockpress.workers.protocol import CancelSignal, Prompt
from blockpress.workers.types import (
    CanvasEvent,
    CanvasStats,
    DraftEvent,
    EndEvent,
    GenerationResult,
    StreamEvent,
    Timings,
    result_of,
)

if TYPE_CHECKING:
    from blockpress.runtime.queue.jobqueue import Claim, JobQueue
    from blockpress.workers.outcome import Ending

__all__ = [
    "SPECIAL_TOKENS",
    "TINY_VISION_CONFIG",
    "FakeEngine",
    "FakeSession",
    "PromptFaults",
    "build_tiny_checkpoint",
    "build_tokenizer",
    "tiny_config",
    "wrap_tokenizer",
]

# Order fixes the ids: pad 0, eos 1, bos 2 as in the DiffusionGemma config, then Gemma 4's chat tokens.
SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>",
    "<|turn>", "<turn|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
    "<|tool_response>", "<tool_response|>", '<|"|>',
]  # fmt: skip

_TEMPLATE = TINY_CALCULATOR / "chat_template.jinja"  # the one copy: the shipped checkpoint's

# The class always builds a Gemma 4 vision tower; at this size it is negligible (0.7M parameters) and
# text-only checkpoints never run it.
TINY_VISION_CONFIG = {
    "model_type": "gemma4_vision",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def tiny_config(
    *,
    vocab_size: int = 512,
    canvas_length: int = 32,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_experts: int = 4,
    top_k_experts: int = 2,
    context_length: int = 4096,
    sliding_window: int = 128,
) -> Any:
    """A `DiffusionGemmaConfig` of the real architecture at toy size (a negligible vision tower)."""
    from transformers import DiffusionGemmaConfig

    heads = max(1, hidden_size // 32)
    layer_types = ["sliding_attention"] * (num_layers - 1) + ["full_attention"]
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": 32,
        "global_head_dim": 32,
        "num_experts": num_experts,
        "top_k_experts": top_k_experts,
        "moe_intermediate_size": hidden_size,
        "sliding_window": sliding_window,
        "max_position_embeddings": context_length,
        "layer_types": layer_types,
    }
    return DiffusionGemmaConfig(
        text_config=text_config, vision_config=dict(TINY_VISION_CONFIG), canvas_length=canvas_length
    )


def build_tokenizer(vocab_size: int) -> Any:
    """A byte-level tokenizer with the chat tokens and the chat template, exactly `vocab_size` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    byte_chars = sorted(set(pre_tokenizers.ByteLevel.alphabet()))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size must be at least {len(vocab)} for a byte-level vocabulary")
    while len(vocab) < vocab_size:  # ids a random model can emit must still decode
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Any) -> Any:
    """A `tokenizers.Tokenizer` as a transformers tokenizer with the special tokens and the chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = _TEMPLATE.read_text()
    return fast


def build_tiny_checkpoint(path: str | Path, *, seed: int = 0, **config: Any) -> Path:
    """Writes a random-weight checkpoint with tokenizer and generation config to `path`; returns it.

    Keyword arguments go to `tiny_config`. The generation config stops at `<eos>` and `<turn|>`.
    """
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    path = Path(path)
    cfg = tiny_config(**config)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    tokenizer = build_tokenizer(cfg.text_config.vocab_size)
    model.generation_config = DiffusionGemmaGenerationConfig(
        max_new_tokens=64,
        max_denoising_steps=8,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1),
        t_min=0.4,
        t_max=0.8,
        stability_threshold=1,
        confidence_threshold=0.005,
        eos_token_id=[SPECIAL_TOKENS.index("<eos>"), SPECIAL_TOKENS.index("<turn|>")],
        pad_token_id=0,
        bos_token_id=2,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@dataclass
class FakeSession:
    """What a `FakeEngine` conversation holds: the token ids a next prompt may extend."""

    token_ids: list[int] = field(default_factory=list)


class _CodePoints:
    """A tokenizer of one token per character (its code point), callable as a transformers one is."""

    def __call__(self, text: str, *, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


class FakeEngine:
    """An `Engine` without torch: every generation writes `text`, cut into canvases.

    Tokens are characters (their code points), so `decode(encode(s)) == s`. Each canvas takes `steps`
    drafts, and `cancel` is checked before each of them, as the real engine does. A `template` pins
    characters as the real engine pins tokens. Every prompt it was asked to continue is kept in
    `prompts`.

    Args:
        text: what each generation writes, up to `max_new_tokens` characters.
        canvas_length: characters per canvas.
        steps: denoising steps (drafts) per canvas.
        model_name: the served model's name.
        step_gate: when given, each step waits for it (a test holds a job mid-generation this way).
    """

    def __init__(
        self,
        text: str = "a fake answer",
        *,
        canvas_length: int = 8,
        steps: int = 2,
        model_name: str = "fake",
        step_gate: threading.Event | None = None,
    ) -> None:
        self.text = text
        self.canvas_length = canvas_length
        self.steps = steps
        self.model_name = model_name
        self.tokenizer = _CodePoints()
        self.step_gate = step_gate
        self.defaults = DenoiseSettings(max_new_tokens=64, max_denoising_steps=steps, seed=0, stop_token_ids=())
        self.prompts: list[list[int]] = []

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(t) for t in token_ids)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        names = ",".join(t["function"]["name"] for t in tools or ())
        rendered = "".join(f"<{m['role']}>{m.get('content')}" for m in messages)
        return self.encode(f"[tools:{names}]{rendered}<model>" if names else f"{rendered}<model>")

    def resolve(self, settings: DenoiseSettings | None = None) -> DenoiseSettings:
        return (settings or DenoiseSettings()).merged_over(self.defaults)

    def new_session(self) -> FakeSession:
        return FakeSession()

    def stream(
        self,
        prompt: Prompt,
        settings: DenoiseSettings | None = None,
        *,
        cancel: CancelSignal | None = None,
        session: Any = None,
        template: Sequence[int | None] | None = None,
    ) -> Iterator[StreamEvent]:
        resolved = self.resolve(settings)
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not prompt_ids:
            raise InvalidRequest("prompt: is empty; send at least one token of text")
        return self._run(prompt_ids, resolved, cancel, session, template)

    def _run(
        self,
        prompt_ids: list[int],
        s: DenoiseSettings,
        cancel: CancelSignal | None,
        session: FakeSession | None,
        template: Sequence[int | None] | None,
    ) -> Iterator[StreamEvent]:
        assert s.max_new_tokens is not None
        self.prompts.append(prompt_ids)
        cached = session.token_ids if session is not None else []
        prefilled = len(prompt_ids) - (len(cached) if prompt_ids[: len(cached)] == cached else 0)
        ids = self.encode(self.text)[: s.max_new_tokens]
        for i, t in enumerate(template or ()):
            if t is not None and i < len(ids):
                ids[i] = t
            elif t is not None:
                ids.append(t)
        ids = ids[: s.max_new_tokens]
        is_set = (cancel.is_set if isinstance(cancel, threading.Event) else cancel) if cancel else None
        canvases: list[CanvasStats] = []
        starts = range(0, max(len(ids), 1), self.canvas_length)
        for index, start in enumerate(starts):
            chunk = ids[start : start + self.canvas_length]
            for step in range(1, self.steps + 1):
                if self.step_gate is not None:
                    self.step_gate.wait()
                if is_set is not None and is_set():
                    raise GenerationCancelled("cancelled between two denoising steps")
                yield DraftEvent(index, step, chunk, len(chunk), 0.0, 0.0)
            stats = CanvasStats(index, self.steps, self.steps, len(chunk), 0.0, [len(chunk)] * self.steps,
                                [0.0] * self.steps)  # fmt: skip
            canvases.append(stats)
            yield CanvasEvent(index, chunk, self.decode(chunk), stats, last=index == len(starts) - 1)
        if session is not None:
            session.token_ids = prompt_ids + ids
        stop = "stop_token" if len(ids) < s.max_new_tokens else "max_new_tokens"
        result = GenerationResult(ids, self.decode(ids), stop, len(prompt_ids), prefilled, canvases, Timings(), 0)
        yield EndEvent(result)

    def generate(
        self,
        prompt: Prompt,
        settings: DenoiseSettings | None = None,
        *,
        cancel: CancelSignal | None = None,
        session: Any = None,
        template: Sequence[int | None] | None = None,
    ) -> GenerationResult:
        return result_of(self.stream(prompt, settings, cancel=cancel, session=session, template=template))


@dataclass(frozen=True)
class PromptFaults(FaultInjector):
    """Ends the replica's process at a fault point for jobs whose prompt starts with a marker.

    Installed only by tests (`ReplicaPool(..., faults=PromptFaults())`); a replica without it never
    looks at a prompt for markers. The markers, each followed by the end of the prompt or a space:

    - `@fault:crash`: on every attempt, before the engine runs (the job ends DEAD_LETTERED);
    - `@fault:crash-first`: the same, on attempt 1 only (the redelivery completes);
    - `@fault:exit-before-ack`: after the final state is written, before the stream entry is
      acknowledged (the next delivery only settles it).
    """

    exit: Any = field(default=os._exit, repr=False)
    """How the process ends (tests in one process pass something that raises instead)."""

    def job_started(self, claim: Claim) -> None:
        if _marked(claim, "@fault:crash") or (_marked(claim, "@fault:crash-first") and claim.attempt == 1):
            self.exit(72)

    async def before_finish(self, claim: Claim, queue: JobQueue, ending: Ending) -> None:
        if _marked(claim, "@fault:exit-before-ack") and ending.state is not None:
            # The queue keeps its unacknowledged write protected: only a fault test may open that window.
            await queue._write_final(
                claim, ending.state, result=ending.result, error=ending.error, events=ending.events, ack=False
            )
            self.exit(71)


def _marked(claim: Claim, marker: str) -> bool:
    prompt = claim.spec.prompt or ""
    return prompt == marker or prompt.startswith(marker + " ")
