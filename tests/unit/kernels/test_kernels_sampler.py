"""The fused sampler kernels against their torch reference, under Triton's CPU interpreter.

Tolerances: fp32 statistics to 1e-5 relative (the kernel's tanh and online sums differ from torch's
in the last bits); probabilities written in bf16 to one bf16 step (2^-7 relative: the interpreter
truncates where a GPU rounds). Argmax must be a maximum of the reference's scaled logits. Samples are
random on both sides with different generators: checked where they are determined (peaked rows,
pins) and, elsewhere, by their distribution.
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import pytest
import torch

from blockpress.workers.kernels import resolve_kernels, sample_step, use_triton
from blockpress.workers.kernels.sampler import sample_step_reference


@pytest.fixture(scope="module")
def kernels(interpreted: SimpleNamespace) -> ModuleType:
    return interpreted.sampler  # type: ignore[no-any-return]


def _scaled(logits: torch.Tensor, softcap: float | None, temperature: float) -> torch.Tensor:
    x = logits.float()
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("length", "vocab"), [(1, 17), (7, 1000), (5, 4097), (3, 9000)])
@pytest.mark.parametrize(("softcap", "temperature"), [(30.0, 0.7), (None, 1.3)])
def test_row_statistics_match_torch(
    kernels: ModuleType, dtype: torch.dtype, length: int, vocab: int, softcap: float | None, temperature: float
) -> None:
    torch.manual_seed(length * vocab)
    logits = (torch.randn(length, vocab) * 8).to(dtype)
    logits[0, vocab // 2] = 60.0  # a pinned maximum, past the softcap's knee
    argmax, entropy, lse, _ = kernels.row_statistics(
        logits, softcap=softcap, temperature=temperature, sc_dtype=torch.float32
    )
    x = _scaled(logits, softcap, temperature)
    ref_lse = torch.logsumexp(x, -1)
    ref_entropy = -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-4, atol=2e-5)
    # Ties after rounding may pick another index; it must still be a maximum.
    picked = x.gather(1, argmax.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(picked, x.max(-1).values, rtol=1e-6, atol=1e-6)
    assert argmax[0] == vocab // 2


def _peaked(length: int, vocab: int, peaks: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Rows 0, 2, 4, ... put almost all mass on `peaks[row]`; odd rows are nearly flat."""
    torch.manual_seed(0)
    logits = torch.randn(1, length, vocab) * 0.1
    for row in range(0, length, 2):
        logits[0, row, peaks[row]] = 25.0
    return logits.to(dtype)


@pytest.mark.parametrize("sc_dtype", [torch.float32, torch.bfloat16])
def test_sample_step_matches_the_reference_with_pins(kernels: ModuleType, sc_dtype: torch.dtype) -> None:
    length, vocab = 9, 777
    peaks = [(13 * r + 5) % vocab for r in range(length)]
    logits = _peaked(length, vocab, peaks, sc_dtype)
    pinned_mask = torch.zeros(length, dtype=torch.bool)
    pinned_mask[[1, 6]] = True  # a flat row and a peaked one
    pinned_ids = torch.full((length,), 3)
    common = {
        "softcap": None,
        "temperature": 1.0,
        "entropy_bound": 0.5,
        "sc_dtype": sc_dtype,
        "pinned_ids": pinned_ids,
        "pinned_mask": pinned_mask,
    }
    ours = sample_step(logits.clone(), generator=torch.Generator().manual_seed(1), mode="triton", **common)
    ref = sample_step_reference(logits.clone(), generator=torch.Generator().manual_seed(1), **common)
    assert torch.equal(ours.argmax, ref.argmax)
    assert torch.equal(ours.accept, ref.accept)
    torch.testing.assert_close(ours.entropy, ref.entropy, rtol=1e-4, atol=1e-5)
    tolerance = {"rtol": 1e-5, "atol": 1e-7} if sc_dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-6}
    assert ours.sc_probs.dtype == sc_dtype and ours.sc_probs.shape == (1, length, vocab)
    torch.testing.assert_close(ours.sc_probs.float(), ref.sc_probs.float(), **tolerance)  # type: ignore[arg-type]
    canvas = ours.next_canvas[0]
    assert canvas[pinned_mask].tolist() == [3, 3] and ours.entropy[pinned_mask].tolist() == [0.0, 0.0]
    for row in range(0, length, 2):  # peaked rows are accepted and their sample is the peak
        if not pinned_mask[row]:
            assert ours.accept[row] and canvas[row] == peaks[row]
    assert not ours.accept[3] and 0 <= int(canvas[3]) < vocab  # flat, unpinned: renoised


def test_softcap_and_temperature_reach_the_self_conditioning_probabilities(kernels: ModuleType) -> None:
    torch.manual_seed(3)
    logits = torch.randn(1, 4, 300) * 40
    common = {"softcap": 30.0, "temperature": 0.55, "entropy_bound": 1.0, "sc_dtype": torch.float32}
    ours = sample_step(logits.clone(), generator=torch.Generator().manual_seed(0), mode="triton", **common)
    ref = sample_step_reference(logits.clone(), generator=torch.Generator().manual_seed(0), **common)
    torch.testing.assert_close(ours.sc_probs, ref.sc_probs, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ours.entropy, ref.entropy, rtol=1e-4, atol=1e-5)


def test_gumbel_samples_follow_the_distribution(kernels: ModuleType) -> None:
    """Every row the same 4-way distribution, every row accepted: a chi-square test over the rows."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    rows = 600  # the interpreter runs one program per row, ~10 ms each
    logits = probs.log().expand(rows, 4).contiguous()
    lse_sc = torch.logsumexp(logits, -1)
    argmax = torch.zeros(rows, dtype=torch.long)
    accept = torch.ones(rows, dtype=torch.bool)
    seed = torch.tensor([12345])
    _, sample = kernels.probabilities_and_samples(
        logits, lse_sc, argmax, accept, seed, softcap=None, temperature=1.0, sc_dtype=torch.float32
    )
    counts = torch.bincount(sample, minlength=4).double()
    expected = probs.double() * rows
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # p = 0.001 at 3 degrees of freedom
    _, again = kernels.probabilities_and_samples(
        logits, lse_sc, argmax, accept, seed, softcap=None, temperature=1.0, sc_dtype=torch.float32
    )
    assert torch.equal(sample, again)  # the seed decides the draw


def test_rejected_rows_keep_their_argmax(kernels: ModuleType) -> None:
    logits = torch.randn(6, 50)
    argmax = logits.argmax(-1)
    _, _, _, lse_sc = kernels.row_statistics(logits, softcap=None, temperature=1.0, sc_dtype=torch.float32)
    _, sample = kernels.probabilities_and_samples(
        logits,
        lse_sc,
        argmax,
        torch.zeros(6, dtype=torch.bool),
        torch.tensor([1]),
        softcap=None,
        temperature=1.0,
        sc_dtype=torch.float32,
    )
    assert torch.equal(sample, argmax)


def test_one_switch_chooses_the_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BLOCKPRESS_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_kernels(None) == "auto"
    assert not use_triton("auto", "cpu")  # the CPU runs the references
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        use_triton("triton", "cpu")
    monkeypatch.setenv("BLOCKPRESS_KERNELS", "off")
    assert resolve_kernels("triton") == "torch"
    assert not use_triton(resolve_kernels("triton"), "cuda")
    monkeypatch.setenv("BLOCKPRESS_KERNELS", "fast")
    with pytest.raises(ValueError, match="BLOCKPRESS_KERNELS"):
        resolve_kernels(None)
    monkeypatch.delenv("BLOCKPRESS_KERNELS")
    with pytest.raises(ValueError, match="kernels"):
        resolve_kernels("cuda")
