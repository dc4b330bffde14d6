"""The engine against transformers' own `generate()` on the same small random checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
)

from blockpress.workers import DenoiseSettings, DiffusionEngine
from blockpress.workers.denoiser import Denoiser, _entropy_bound_accept
from blockpress.workers.hf_compat import cache_kwargs


def _reference(engine: DiffusionEngine, prompt_ids: list[int], seed: int, **kwargs: object) -> list[int]:
    """transformers' generate() output, cut as the engine cuts: before a stop token, at the token limit."""
    s = engine.resolve(DenoiseSettings(**kwargs))  # type: ignore[arg-type]
    torch.manual_seed(seed)
    out = engine.model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=s.max_new_tokens,
        max_denoising_steps=s.max_denoising_steps,
        t_min=s.t_min,
        t_max=s.t_max,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=s.entropy_bound),
        stability_threshold=s.stability_threshold,
        confidence_threshold=s.confidence_threshold or 1e-30,
    )
    new = out.sequences[0, len(prompt_ids) :].tolist()
    stops = set(s.stop_token_ids or ())
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    return new[: min(cut, s.max_new_tokens or len(new))]


@pytest.mark.parametrize(
    ("seed", "settings"),
    [
        (0, {}),  # the checkpoint's defaults: adaptive stop on
        (1, {"max_new_tokens": 96, "confidence_threshold": 0.0}),  # fixed steps, three canvases
        (2, {"max_new_tokens": 40, "entropy_bound": 2.0, "t_min": 0.2, "t_max": 1.5, "stability_threshold": 2}),
    ],
)
def test_token_for_token_with_the_same_draws(engine_checkpoint: Path, seed: int, settings: dict) -> None:
    engine = DiffusionEngine.from_pretrained(engine_checkpoint, sampler="multinomial")
    prompt_ids = engine.encode("The same random draws give the same tokens.")
    ours = engine.generate(prompt_ids, DenoiseSettings(seed=seed, **settings))
    theirs = _reference(engine, prompt_ids, seed, **settings)
    assert ours.token_ids == theirs
    assert len(ours.token_ids) > 0


def test_per_step_quantities_agree(engine: DiffusionEngine) -> None:
    """Gumbel-max samples differently from multinomial on purpose; everything it samples from agrees."""
    session = engine.new_session()
    session.prefill(engine.encode("Per-step quantities"))
    denoiser = Denoiser(engine.model)
    torch.manual_seed(3)
    length, vocab = engine.canvas_length, engine.vocab_size
    positions = torch.arange(session.length, session.length + length, dtype=torch.int32).unsqueeze(0)
    canvas = torch.randint(0, vocab, (1, length))
    previous = torch.randn(1, length, vocab) * 3
    with torch.inference_mode():
        reference = engine.model(
            decoder_input_ids=canvas,
            self_conditioning_logits=previous,
            **cache_kwargs(session.cache),
            decoder_position_ids=positions,
        ).logits
        ours = denoiser.decoder_logits(canvas, previous.softmax(-1), session.cache, positions)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)

    steps = 8
    processor = LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=steps)
    scaled_ref = processor(canvas, reference, cur_step=torch.tensor(steps, dtype=torch.int32))
    entropy_ref = torch.distributions.Categorical(logits=scaled_ref).entropy()[0]
    scaled = reference[0] / (0.4 + 0.4 * (torch.tensor(steps, dtype=torch.int32) / steps))
    entropy = -(scaled.softmax(-1) * scaled.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(entropy, entropy_ref, rtol=1e-5, atol=1e-6)

    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=0.5), length, vocab, steps)
    sampler.accept_canvas(canvas, canvas, scaled_ref, steps)
    assert torch.equal(_entropy_bound_accept(entropy_ref, 0.5), sampler.accepted_token_mask[0])


def test_gumbel_race_samples_the_distribution() -> None:
    """The exponential race picks index i with probability p_i (a chi-square check, fixed seed)."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    gen = torch.Generator().manual_seed(0)
    draws = 20_000
    rows = probs.expand(draws, 4)
    picks = (rows / torch.empty_like(rows).exponential_(generator=gen)).argmax(-1)
    counts = torch.bincount(picks, minlength=4).double()
    expected = probs.double() * draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # p = 0.001 at 3 degrees of freedom
