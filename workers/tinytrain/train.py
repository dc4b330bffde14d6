"""The training loop: block-diffusion denoising of synthetic calculator conversations on CPU.

A step encodes a few whole conversations once with the causal encoder and denoises every canvas of
every model turn in them against the part of its conversation before that turn, as the engine
prefills a turn's prompt and earlier canvases. Each canvas has a random fraction of its tokens replaced
by uniformly random tokens (as the engine's first step and its renoising do), except that half of the
replaced digits get another digit, so that a digit in the canvas is not evidence of itself; 40% of the
steps also feed the model its own previous prediction as self-conditioning, as every step after the
engine's first does. The loss is cross-entropy over the whole canvas, including the <pad> tokens after
<turn|>, so that a trained model fills the rest of its last canvas with padding and stops there.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DiffusionGemmaForBlockDiffusion, PreTrainedTokenizerFast

from blockpress.workers.hf_compat import cache_kwargs, output_cache
from blockpress.workers.tinytrain.build import build_generation_config, build_model_config, build_tokenizer
from blockpress.workers.tinytrain.data import (
    TWO_STEP_RATE,
    random_samples,
    random_system_prompt,
    random_tools,
    render_prefix,
)

__all__ = ["TrainSettings", "train"]


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """What a training run does; the defaults are the shipped checkpoint's run (docs/tiny-checkpoint.md)."""

    seed: int = 0
    """Seeds data, initialisation, noise and the tokenizer's corpus: the same seed gives the same weights."""
    steps: int = 4500
    """Optimizer steps."""
    batch_size: int = 8
    """Conversations per step; each gives every canvas of its two or three model turns."""
    noisings: int = 2
    """Noised copies of each canvas per step: the decoder passes are cheap beside the encoder's."""
    lr: float = 4e-3
    """Peak learning rate (linear warm-up, cosine decay)."""
    warmup: int = 50
    """Warm-up steps."""
    self_condition_rate: float = 0.4
    """Fraction of examples that see the model's own previous prediction."""
    threads: int = 1
    """torch CPU threads. Two are about 1.4x faster than one on an idle 2-core machine; on cores shared with
    other jobs two threads ran up to ten times slower than one."""
    init_from: Path | None = None
    """Continue from this checkpoint's weights and tokenizer instead of a fresh initialisation."""
    save_every: int = 0
    """Also save the checkpoint every this many steps (0: only at the end), to try a run while it trains."""
    hidden_size: int = 96
    """Model width (a fresh initialisation only)."""
    layers: int = 3
    """Decoder layers (a fresh initialisation only)."""
    heads: int = 6
    """Attention heads (a fresh initialisation only)."""
    kv_heads: int = 6
    """Key/value heads (a fresh initialisation only). Six of width 16 copied the second call's operand
    better than four query heads sharing two of width 24."""
    two_step_rate: float = TWO_STEP_RATE
    """Share of two-step conversations, as in the held-out sets. More of them (0.7) gave a worse second
    call for the same time: fewer steps fit, and the step count is what that turn needed."""
    digit_confusion: float = 0.5
    """Of the noised positions whose target is a digit, the fraction that gets another digit instead of a
    uniformly random token. Without it a digit in the canvas is almost always right, and a model learns
    to keep digits it sees instead of checking them against the prompt; at inference the digits it sees
    are its own samples."""
    own_digits: float = 0.5
    """Of those confusing digits, the fraction drawn from the canvas's own digits rather than uniformly:
    a follow-up operand copied as 66 for 64 or 21 for 12 is the error this trains against."""


@dataclass
class _Batch:
    shared: torch.Tensor  # (1, P): the system turn every conversation of the batch starts with
    ids: torch.Tensor  # (B, L): the rest of each whole conversation, right-padded
    mask: torch.Tensor  # (B, L): 1 on real tokens of `ids`
    rows: torch.Tensor  # (N,): the conversation each canvas belongs to
    starts: torch.Tensor  # (N,): how many of its row's tokens come before the canvas (its prompt in `ids`)
    targets: torch.Tensor  # (N, C): the canvases to denoise

    def repeat(self, times: int) -> _Batch:
        """Every canvas `times` times (each copy is noised on its own); the conversations are not repeated."""
        return _Batch(
            self.shared,
            self.ids,
            self.mask,
            self.rows.repeat(times),
            self.starts.repeat(times),
            self.targets.repeat(times, 1),
        )


def _batch(
    tokenizer: PreTrainedTokenizerFast, rng: random.Random, size: int, canvas: int, two_step_rate: float = TWO_STEP_RATE
) -> _Batch:
    """`size` random conversations under one random system prompt and tool list, with every canvas of
    every model turn in them.

    A causal encoder's state at a position depends only on the tokens before it, so one encoder pass
    over a whole conversation serves as the prompt of each of its model turns: the decoder of a turn's
    canvas masks the slots from that turn on. That is two or three canvases per encoded conversation
    where one canvas per prompt cost an encoder pass each.
    """
    system = random_system_prompt(rng)
    tools = random_tools(rng)
    head = [] if system is None else [{"role": "system", "content": system}]
    # Rendered with a placeholder user turn (the template refuses an empty conversation), then cut there.
    probe = render_prefix(tokenizer, [*head, {"role": "user", "content": "x"}], tools)
    shared_text = probe[: probe.index("<|turn>user")]
    shared = tokenizer(shared_text, add_special_tokens=False)["input_ids"]
    rests: list[list[int]] = []
    rows: list[int] = []
    starts: list[int] = []
    targets: list[list[int]] = []
    for row in range(size):
        samples = random_samples(rng, system, two_step_rate=two_step_rate)
        last = samples[-1]
        whole = render_prefix(tokenizer, last.messages, tools) + last.target + "<turn|>"
        ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
        if ids[: len(shared)] != shared:
            raise AssertionError("the system turn did not tokenize the same inside the full conversation")
        for sample in samples:
            prompt = tokenizer(render_prefix(tokenizer, sample.messages, tools), add_special_tokens=False)
            begin = len(prompt["input_ids"])
            turn = tokenizer(sample.target + "<turn|>", add_special_tokens=False)["input_ids"]
            if ids[:begin] != prompt["input_ids"] or ids[begin : begin + len(turn)] != turn:
                # Then a turn's prompt inside the conversation would not be the prompt inference builds.
                raise AssertionError("a model turn did not tokenize the same inside the full conversation")
            n_canvases = math.ceil(len(turn) / canvas)
            turn = turn + [tokenizer.pad_token_id] * (n_canvases * canvas - len(turn))
            for k in range(n_canvases):
                rows.append(row)
                starts.append(begin - len(shared) + k * canvas)
                targets.append(turn[k * canvas : (k + 1) * canvas])
        rests.append(ids[len(shared) :])
    width = max(len(r) for r in rests)
    ids_t = torch.full((size, width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((size, width), dtype=torch.long)
    for i, rest in enumerate(rests):
        ids_t[i, : len(rest)] = torch.tensor(rest)
        mask[i, : len(rest)] = 1
    return _Batch(torch.tensor([shared]), ids_t, mask, torch.tensor(rows), torch.tensor(starts), torch.tensor(targets))


def _noise(b: _Batch, vocab: int, digits: torch.Tensor, settings: TrainSettings, gen: torch.Generator) -> torch.Tensor:
    """The noised canvases: each position replaced, at its canvas's rate, by a random token (or digit)."""
    batch, canvas = b.targets.shape
    rate = torch.rand((batch, 1), generator=gen)
    noised = torch.rand((batch, canvas), generator=gen) < rate
    noise = torch.randint(0, vocab, (batch, canvas), generator=gen)
    is_digit = torch.isin(b.targets, digits)
    other_digit = digits[torch.randint(0, len(digits), (batch, canvas), generator=gen)]
    if settings.own_digits:
        # A digit of the same canvas: a copied number's own digits out of order are the model's usual mistake.
        # (A canvas without digits draws from all its positions; nothing of it is confused anyway.)
        weights = is_digit.float() + (~is_digit.any(dim=1, keepdim=True)).float()
        own = b.targets.gather(1, torch.multinomial(weights, canvas, replacement=True, generator=gen))
        other_digit = torch.where(torch.rand((batch, canvas), generator=gen) < settings.own_digits, own, other_digit)
    confuse = is_digit & (torch.rand((batch, canvas), generator=gen) < settings.digit_confusion)
    noise = torch.where(confuse, other_digit, noise)
    return torch.where(noised, noise, b.targets)


def _encode(model: DiffusionGemmaForBlockDiffusion, b: _Batch) -> dict[str, Any]:
    """Encodes every conversation of the batch; returns the decoder's inputs but the canvases themselves.

    For each canvas the decoder then sees what the engine's decoder sees for that canvas's prompt alone
    (tests/unit/test_tiny_checkpoint.py checks the logits match).
    """
    conversations = b.ids.shape[0]
    canvases, canvas = b.targets.shape
    encoder = model.model.encoder
    # The system turn (tool declarations) is the same for the whole batch and is most of every prompt:
    # encoding it once, without gradient, and sharing its KV cuts a step's cost by about three. The
    # values are exactly what inference sees; only the gradient into how that turn is encoded is lost.
    shared_len = b.shared.shape[1]
    window = model.config.get_text_config().sliding_window
    if window is not None and shared_len + b.ids.shape[1] > window:
        # Past the window the sliding layers would drop real prompt tokens that inference keeps.
        raise ValueError(f"a padded batch of {shared_len + b.ids.shape[1]} tokens exceeds the {window}-token window")
    with torch.no_grad():
        cache = output_cache(encoder(input_ids=b.shared))
    cache.batch_repeat_interleave(conversations)
    # Right padding keeps every encoder row's causal attention non-empty.
    ones = torch.ones((conversations, shared_len), dtype=b.mask.dtype)
    enc_mask = torch.cat([ones, b.mask], dim=1)
    positions = (shared_len + torch.arange(b.ids.shape[1])).unsqueeze(0).expand(conversations, -1)
    out = encoder(input_ids=b.ids, attention_mask=enc_mask, position_ids=positions, **cache_kwargs(cache))
    cache = output_cache(out)
    cache.batch_select_indices(b.rows)
    # Each canvas sees its conversation's slots before its own turn (the later ones are masked like the
    # padding) and sits right after them, as the engine places a canvas after its prompt.
    before = (torch.arange(b.ids.shape[1]).unsqueeze(0) < b.starts.unsqueeze(1)).to(b.mask.dtype)
    seen = torch.cat([ones[:1].expand(canvases, -1), before], dim=1)
    return {
        **cache_kwargs(cache),
        "decoder_attention_mask": torch.cat([seen, torch.ones((canvases, canvas), dtype=b.mask.dtype)], dim=1),
        "decoder_position_ids": (shared_len + b.starts).unsqueeze(1) + torch.arange(canvas).unsqueeze(0),
    }


def _loss(
    model: DiffusionGemmaForBlockDiffusion,
    b: _Batch,
    gen: torch.Generator,
    settings: TrainSettings,
    digits: torch.Tensor,
) -> torch.Tensor:
    b = b.repeat(settings.noisings)
    batch, _ = b.targets.shape
    vocab = model.config.get_text_config().vocab_size
    noised = _noise(b, vocab, digits, settings, gen)
    common = {**_encode(model, b), "decoder_input_ids": noised}
    # Self-conditioning is decided per batch so that batches without it skip the extra pass.
    if torch.rand((), generator=gen) < settings.self_condition_rate:
        with torch.no_grad():
            # The engine feeds back temperature-scaled logits (t between t_min and t_max).
            temperature = 0.4 + 0.4 * torch.rand((batch, 1, 1), generator=gen)
            previous = model(**common).logits / temperature
        logits = model(**common, self_conditioning_logits=previous).logits
    else:
        logits = model(**common).logits
    return F.cross_entropy(logits.reshape(-1, vocab), b.targets.reshape(-1))


def _plot(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on the machines this runs on
    import matplotlib.pyplot as plt

    window = 25
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.3, label="per step")
    ax.plot(smooth, label=f"mean of {window}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("canvas cross-entropy")
    ax.set_title("tiny-calculator training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _save(model: DiffusionGemmaForBlockDiffusion, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def train(out: Path, settings: TrainSettings = TrainSettings()) -> dict[str, Any]:
    """Trains the tiny calculator checkpoint and saves it (and `loss.png`, `train_log.json`) into `out`."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)

    if settings.init_from is not None:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(settings.init_from)
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(settings.init_from, dtype=torch.float32)
        config = model.config
    else:
        tokenizer = build_tokenizer(seed=settings.seed)
        config = build_model_config(
            len(tokenizer),
            hidden_size=settings.hidden_size,
            layers=settings.layers,
            heads=settings.heads,
            kv_heads=settings.kv_heads,
        )
        model = DiffusionGemmaForBlockDiffusion(config)
    model.generation_config = build_generation_config(tokenizer)
    model.train()
    assert config.canvas_length is not None
    canvas = config.canvas_length
    digits = torch.tensor(tokenizer.convert_tokens_to_ids(list("0123456789")))  # one token per digit

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return settings.lr * (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(range(settings.steps), desc="train", unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = _batch(tokenizer, rng, settings.batch_size, canvas, settings.two_step_rate)
        loss = _loss(model, batch, gen, settings, digits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
        if settings.save_every and (step + 1) % settings.save_every == 0 and step + 1 < settings.steps:
            _save(model, tokenizer, out / "partial")
    wall_s = time.perf_counter() - started

    _save(model, tokenizer, out)
    _plot(losses, out / "loss.png")
    log = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.__dict__.items()},
        "wall_s": round(wall_s, 1),
        "final_loss_mean_50": sum(losses[-50:]) / len(losses[-50:]),
        "losses_every_10": [round(x, 5) for x in losses[::10]],
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log
