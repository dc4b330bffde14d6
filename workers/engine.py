"""The DiffusionGemma engine: one model replica at batch size 1, with its own denoising loop.

The loop is transformers' `generate()` for this model (causal prefill into a KV cache; per canvas a
random canvas denoised with self-conditioning, a linear temperature schedule, entropy-bound acceptance
and renoising, and a stable-and-confident stop; the argmax canvas committed into the cache) so that the
runtime can stream every step, cancel between steps, pin tokens and keep the cache across agent turns.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from blockpress.runtime.contracts.settings import TRANSFORMERS_DEFAULTS, DenoiseSettings
from blockpress.workers.denoiser import CanvasPlan, Denoiser, Sampler
from blockpress.workers.errors import EngineBroken, GenerationCancelled, InvalidRequest, PromptTooLong
from blockpress.workers.kernels.dispatch import KernelMode, resolve_kernels
from blockpress.workers.loading import Quantization, load_checkpoint
from blockpress.workers.session import EngineSession
from blockpress.workers.stepclock import StepClock
from blockpress.workers.types import (
    CanvasEvent,
    CanvasStats,
    DraftEvent,
    EndEvent,
    GenerationResult,
    PrefillStats,
    StopReason,
    StreamEvent,
    Timings,
)

__all__ = ["CancelSignal", "DiffusionEngine"]

CancelSignal = Callable[[], bool] | threading.Event
Prompt = str | Sequence[int]


class DiffusionEngine:
    """Generates text with a `DiffusionGemmaForBlockDiffusion` checkpoint at batch size 1.

    Not thread-safe: one engine runs one generation at a time, which is what a replica does.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        sampler: Sampler = "gumbel",
        kernels: KernelMode | None = None,
        quantization: Quantization | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = name
        text_config = model.config.text_config
        self.canvas_length: int = model.config.canvas_length
        self.context_length: int = text_config.max_position_embeddings
        self.vocab_size: int = text_config.vocab_size
        # The embedding is never quantized, so it tells the compute device and dtype.
        param = model.model.decoder.embed_tokens.weight
        self.device = str(param.device)
        self.dtype = str(param.dtype).removeprefix("torch.")
        self.quantization = quantization
        self.precision: str = quantization or self.dtype
        """How the weights are stored: "float32", "bfloat16", "float16", "nf4" or "fp8"."""
        self.kernels: KernelMode = resolve_kernels(kernels)
        self.defaults = _checkpoint_defaults(model)
        self._denoiser = Denoiser(model, sampler=sampler, kernels=self.kernels, cuda_graphs=cuda_graphs)
        self._clock = StepClock(model.lm_head, param.device)
        if param.device.type == "cpu":
            # x86 cores take microcode assists on denormal floats, and small or freshly initialised
            # weights produce plenty: measured 3x per decoder pass on the benchmark checkpoint. Values
            # below 1e-38 become 0, which changes no argmax worth having. One engine per process (a
            # replica), so the process-wide switch is ours to set.
            torch.set_flush_denormal(True)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike[str],
        *,
        device: str = "auto",
        dtype: str = "auto",
        sampler: Sampler = "gumbel",
        quantization: Quantization | None = None,
        kernels: KernelMode | None = None,
        cuda_graphs: bool = True,
    ) -> DiffusionEngine:
        """Loads a checkpoint and its tokenizer from a local directory or a hub id.

        Args:
            dtype: the compute dtype (`auto`: bfloat16 on a GPU, float32 on the CPU).
            quantization: `nf4` or `fp8` stores the layers' weights packed, quantized layer by layer
                as the checkpoint loads; None keeps them in `dtype`.
            kernels: `auto` (Triton on a GPU, torch elsewhere), `triton` or `torch`; the environment's
                `BLOCKPRESS_KERNELS=off` overrides it.
            cuda_graphs: on a CUDA device, replay each canvas's decoder pass from a captured graph.

        Raises:
            ModelConfigError: the directory is missing, holds another architecture, or the dtype or the
                quantization cannot run on the device.
        """
        mode = resolve_kernels(kernels)
        model, tokenizer = load_checkpoint(
            str(path_or_id), device=device, dtype=dtype, quantization=quantization, kernels=mode
        )
        name = Path(str(path_or_id)).name if os.path.isdir(path_or_id) else str(path_or_id)
        return cls(
            model,
            tokenizer,
            name=name,
            sampler=sampler,
            kernels=mode,
            quantization=quantization,
            cuda_graphs=cuda_graphs,
        )

    # ---- text helpers -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=False))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of `messages` rendered with the checkpoint's chat template, ready for the model's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest(f"messages: the checkpoint {self.model_name!r} has no chat template; send a prompt")
        rendered = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    # ---- settings and limits ------------------------------------------------------------------------

    def resolve(self, settings: DenoiseSettings | None = None) -> DenoiseSettings:
        """The settings a generation will use: the request's, then the checkpoint's, then transformers'."""
        return (settings or DenoiseSettings()).merged_over(self.defaults)

    def check_prompt(self, prompt_ids: Sequence[int], settings: DenoiseSettings | None = None) -> None:
        """Raises `PromptTooLong` unless the prompt and the requested canvases fit the context."""
        resolved = self.resolve(settings)
        assert resolved.max_new_tokens is not None
        canvas_tokens = math.ceil(resolved.max_new_tokens / self.canvas_length) * self.canvas_length
        if not prompt_ids:
            raise InvalidRequest("prompt: is empty; send at least one token of text")
        if len(prompt_ids) + canvas_tokens > self.context_length:
            raise PromptTooLong(len(prompt_ids), self.context_length, canvas_tokens)

    def new_session(self) -> EngineSession:
        """A KV cache that outlives one call, for conversations whose prompts extend each other."""
        return EngineSession(self.model)

    # ---- generation ---------------------------------------------------------------------------------

    def generate(
        self,
        prompt: Prompt,
        settings: DenoiseSettings | None = None,
        *,
        cancel: CancelSignal | None = None,
        session: EngineSession | None = None,
        template: Sequence[int | None] | None = None,
    ) -> GenerationResult:
        """Generates until a stop token or `max_new_tokens`. See `stream` for the arguments."""
        for event in self.stream(prompt, settings, cancel=cancel, session=session, template=template):
            if isinstance(event, EndEvent):
                return event.result
        raise AssertionError("stream ended without a result")  # pragma: no cover

    def stream(
        self,
        prompt: Prompt,
        settings: DenoiseSettings | None = None,
        *,
        cancel: CancelSignal | None = None,
        session: EngineSession | None = None,
        template: Sequence[int | None] | None = None,
    ) -> Iterator[StreamEvent]:
        """Yields a `DraftEvent` per denoising step, a `CanvasEvent` per committed canvas, then `EndEvent`.

        Args:
            prompt: text (tokenized with the checkpoint's tokenizer) or token ids.
            settings: overrides of the checkpoint's defaults.
            cancel: checked before every step; when set, `GenerationCancelled` is raised.
            session: reuse this session's KV cache when the prompt extends what it holds.
            template: pinned tokens: new token i is fixed to `template[i]` unless that is None.
        """
        resolved = self.resolve(settings)
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        self.check_prompt(prompt_ids, resolved)
        if template is not None and any(t is not None and not 0 <= t < self.vocab_size for t in template):
            raise InvalidRequest(f"template: token ids must be between 0 and {self.vocab_size - 1}")
        try:
            # No `inference_mode` around this `yield from`: the mode is thread-local and would stay on in the
            # consumer's code between events. The compute inside is wrapped piece by piece instead.
            yield from self._run(prompt_ids, resolved, _cancel_check(cancel), session, template)
        except (GenerationCancelled, InvalidRequest):
            raise
        except torch.OutOfMemoryError as exc:
            raise EngineBroken(f"out of memory: {exc}") from exc
        except RuntimeError as exc:
            if "CUDA" in str(exc) or "cuda" in str(exc):
                raise EngineBroken(f"device error: {exc}") from exc
            raise

    def _run(
        self,
        prompt_ids: list[int],
        s: DenoiseSettings,
        check_cancel: Callable[[], None],
        session: EngineSession | None,
        template: Sequence[int | None] | None,
    ) -> Iterator[StreamEvent]:
        assert s.max_new_tokens and s.max_denoising_steps and s.stability_threshold is not None
        started = time.perf_counter()
        seed = s.seed if s.seed is not None else int.from_bytes(os.urandom(7), "little")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        stop_ids = set(s.stop_token_ids or ())
        session = session or self.new_session()

        check_cancel()
        prefill_started = time.perf_counter()
        with torch.inference_mode():
            prefilled = session.prefill(prompt_ids)
        prefill_s = time.perf_counter() - prefill_started
        prefill: PrefillStats | None = PrefillStats(len(prompt_ids), prefilled, prefill_s)
        clock = self._clock

        new_ids: list[int] = []
        canvases: list[CanvasStats] = []
        first_canvas_s = denoise_s = 0.0
        stop_reason: StopReason = "max_new_tokens"
        for index in range(math.ceil(s.max_new_tokens / self.canvas_length)):
            if index:
                clock.commit_begin()
                with torch.inference_mode():
                    session.append(session.pending)  # commit the previous canvas into the cache
                clock.commit_end()
            plan = self._plan(s, session.length, len(new_ids), template)
            accepted: list[int] = []
            step_times: list[float] = []
            last = None
            tick = time.perf_counter()
            clock.start()
            for out in self._denoiser.run(session.cache, plan, generator, check_cancel):
                step_times.append(time.perf_counter() - tick)
                accepted.append(out.accepted)
                last = out
                yield DraftEvent(index, out.step, out.argmax.tolist(), out.accepted, out.mean_entropy, step_times[-1],
                                 clock.decoder_s(), clock.commit_s(), prefill)  # fmt: skip
                prefill = None
                tick = time.perf_counter()  # the consumer's time with the draft is not the step's
                clock.start()
            assert last is not None
            denoise_s += sum(step_times)
            canvas_ids = last.argmax.tolist()
            session.pending = canvas_ids
            committed, hit_stop = _cut(canvas_ids, stop_ids, s.max_new_tokens - len(new_ids))
            new_ids += committed
            stats = CanvasStats(
                index, last.step, plan.max_steps, len(committed), last.mean_entropy, accepted, step_times
            )
            canvases.append(stats)
            if index == 0:
                first_canvas_s = time.perf_counter() - started
            done = hit_stop or len(new_ids) >= s.max_new_tokens
            yield CanvasEvent(index, committed, self.decode(committed), stats, last=done)
            if hit_stop:
                stop_reason = "stop_token"
            if done:
                break

        timings = Timings(prefill_s, first_canvas_s, denoise_s, time.perf_counter() - started)
        result = GenerationResult(
            new_ids,
            self.decode(new_ids),
            stop_reason,
            len(prompt_ids),
            prefilled,
            canvases,
            timings,
            seed,
        )
        yield EndEvent(result)

    def _plan(
        self, s: DenoiseSettings, position: int, offset: int, template: Sequence[int | None] | None
    ) -> CanvasPlan:
        assert s.max_denoising_steps and s.t_min is not None and s.t_max is not None
        assert s.entropy_bound is not None and s.stability_threshold is not None
        assert s.confidence_threshold is not None
        plan = CanvasPlan(
            start_position=position,
            max_steps=s.max_denoising_steps,
            t_min=s.t_min,
            t_max=s.t_max,
            entropy_bound=s.entropy_bound,
            stability_threshold=s.stability_threshold,
            confidence_threshold=s.confidence_threshold,
        )
        if template is not None:
            window = list(template[offset : offset + self.canvas_length])
            if any(t is not None for t in window):
                window += [None] * (self.canvas_length - len(window))
                plan.pinned_mask = torch.tensor([t is not None for t in window], device=self.device)
                plan.pinned_ids = torch.tensor([t or 0 for t in window], device=self.device)
        return plan


def _cut(canvas_ids: list[int], stop_ids: set[int], room: int) -> tuple[list[int], bool]:
    """The canvas's new tokens before the first stop token, at most `room` of them."""
    for i, token in enumerate(canvas_ids[:room]):
        if token in stop_ids:
            return canvas_ids[:i], True
    return canvas_ids[:room], False


def _cancel_check(cancel: CancelSignal | None) -> Callable[[], None]:
    if cancel is None:
        return lambda: None
    is_set = cancel.is_set if isinstance(cancel, threading.Event) else cancel

    def check() -> None:
        if is_set():
            raise GenerationCancelled("cancelled between two denoising steps")

    return check


def _checkpoint_defaults(model: Any) -> DenoiseSettings:
    """The checkpoint's generation_config.json over transformers' defaults."""
    gen = getattr(model, "generation_config", None)
    values: dict[str, Any] = dict(TRANSFORMERS_DEFAULTS)
    for name in TRANSFORMERS_DEFAULTS:
        if gen is not None and getattr(gen, name, None) is not None:
            values[name] = getattr(gen, name)
    sampler_config = getattr(gen, "sampler_config", None)
    if sampler_config is not None and getattr(sampler_config, "entropy_bound", None) is not None:
        values["entropy_bound"] = sampler_config.entropy_bound
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = model.config.text_config.eos_token_id
    values["stop_token_ids"] = tuple([eos] if isinstance(eos, int) else (eos or ()))
    return dataclasses.replace(DenoiseSettings(), **values)
