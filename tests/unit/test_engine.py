"""What the engine does beyond transformers: streaming, pinning, cancelling, sessions, limits."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from blockpress.workers import (
    CanvasEvent,
    DenoiseSettings,
    DiffusionEngine,
    DraftEvent,
    EndEvent,
    GenerationCancelled,
    InvalidSettings,
    PromptTooLong,
)
from blockpress.workers.errors import InvalidRequest, ModelConfigError


def test_same_seed_same_output_and_another_seed_differs(engine: DiffusionEngine) -> None:
    a = engine.generate("seeded", DenoiseSettings(seed=7, max_new_tokens=40))
    b = engine.generate("seeded", DenoiseSettings(seed=7, max_new_tokens=40))
    c = engine.generate("seeded", DenoiseSettings(seed=8, max_new_tokens=40))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert a.seed == 7


def test_stream_yields_drafts_then_canvases_then_the_end(engine: DiffusionEngine) -> None:
    settings = DenoiseSettings(seed=1, max_new_tokens=64, confidence_threshold=0.0, stop_token_ids=())
    events = list(engine.stream("stream me", settings))
    drafts = [e for e in events if isinstance(e, DraftEvent)]
    canvases = [e for e in events if isinstance(e, CanvasEvent)]
    assert isinstance(events[-1], EndEvent)
    result = events[-1].result
    steps = engine.resolve(settings).max_denoising_steps
    assert len(canvases) == 2 and len(drafts) == 2 * steps  # fixed steps: every canvas runs them all
    assert [d.step for d in drafts[:steps]] == list(range(1, steps + 1))
    assert [t for c in canvases for t in c.token_ids] == result.token_ids
    assert len(result.token_ids) == 64 and result.stop_reason == "max_new_tokens"
    assert all(len(d.token_ids) == engine.canvas_length for d in drafts)
    # The committed canvas is the last step's argmax canvas.
    assert canvases[0].token_ids == drafts[steps - 1].token_ids[: len(canvases[0].token_ids)]


def test_the_consumer_runs_outside_inference_mode_between_events(engine: DiffusionEngine) -> None:
    """Inference mode is thread-local: it must not stay on in the caller's code while the stream waits."""
    import torch

    modes = [torch.is_inference_mode_enabled() for _ in engine.stream("mode", DenoiseSettings(seed=0))]
    assert modes and not any(modes)


def test_stop_token_ends_generation_and_is_not_returned(engine: DiffusionEngine) -> None:
    free = engine.generate("stop here", DenoiseSettings(seed=3, max_new_tokens=64, stop_token_ids=()))
    stop = free.token_ids[5]
    cut = engine.generate("stop here", DenoiseSettings(seed=3, max_new_tokens=64, stop_token_ids=(stop,)))
    assert cut.stop_reason == "stop_token"
    assert cut.token_ids == free.token_ids[: free.token_ids.index(stop)]


def test_pinned_tokens_never_change_and_holes_are_filled(engine: DiffusionEngine) -> None:
    template: list[int | None] = [None] * 40
    pins = {0: 300, 7: 301, 31: 302, 32: 303, 39: 304}  # spans two canvases of 32
    for pos, tok in pins.items():
        template[pos] = tok
    settings = DenoiseSettings(seed=5, max_new_tokens=40, stop_token_ids=())
    events = list(engine.stream("fill the holes", settings, template=template))
    result = events[-1].result  # type: ignore[union-attr]
    assert all(result.token_ids[p] == t for p, t in pins.items())
    for draft in (e for e in events if isinstance(e, DraftEvent)):
        offset = draft.canvas_index * engine.canvas_length
        for pos, tok in pins.items():
            if offset <= pos < offset + engine.canvas_length:
                assert draft.token_ids[pos - offset] == tok
    holes = [t for i, t in enumerate(result.token_ids) if i not in pins]
    assert len(holes) == 40 - len(pins) and len(set(holes)) > 1  # the holes were denoised, not copied


def test_cancel_stops_between_steps(engine: DiffusionEngine) -> None:
    seen = []

    def cancel() -> bool:
        return len(seen) >= 3

    settings = DenoiseSettings(seed=1, max_new_tokens=64, confidence_threshold=0.0)
    with pytest.raises(GenerationCancelled):
        for event in engine.stream("cancel me", settings, cancel=cancel):
            if isinstance(event, DraftEvent):
                seen.append(event)
    assert len(seen) == 3

    flag = threading.Event()
    flag.set()
    with pytest.raises(GenerationCancelled):
        engine.generate("cancel me", settings, cancel=flag)


def test_session_prefills_only_new_tokens_and_matches_a_fresh_run(engine: DiffusionEngine) -> None:
    settings = DenoiseSettings(seed=11, max_new_tokens=32)
    session = engine.new_session()
    first_prompt = engine.encode("turn one of a conversation")
    first = engine.generate(first_prompt, settings, session=session)
    assert first.prefilled_tokens == len(first_prompt)

    second_prompt = first_prompt + first.token_ids + engine.encode("and the tool said 42")[1:]
    warm = engine.generate(second_prompt, settings, session=session)
    assert warm.prefilled_tokens == len(second_prompt) - len(first_prompt)
    cold = engine.generate(second_prompt, settings)
    assert cold.prefilled_tokens == len(second_prompt)
    assert warm.token_ids == cold.token_ids

    unrelated = engine.generate(engine.encode("something else"), settings, session=session)
    assert unrelated.prefilled_tokens == len(engine.encode("something else"))


def test_prompt_too_long_is_refused_before_any_work(engine: DiffusionEngine) -> None:
    too_long = [65] * engine.context_length
    with pytest.raises(PromptTooLong) as info:
        engine.generate(too_long)
    message = str(info.value)
    assert str(engine.context_length) in message and str(len(too_long)) in message
    with pytest.raises(InvalidRequest, match="prompt"):
        engine.generate([])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("max_denoising_steps", -1),
        ("t_min", 0.0),
        ("entropy_bound", -0.5),
        ("confidence_threshold", -1.0),
        ("stability_threshold", 1.5),
        ("seed", "abc"),
    ],
)
def test_invalid_settings_name_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidSettings) as info:
        DenoiseSettings(**{field: value})  # type: ignore[arg-type]
    assert info.value.field == field and field in str(info.value)


def test_t_max_below_t_min_and_unknown_settings_are_refused() -> None:
    with pytest.raises(InvalidSettings, match="t_max"):
        DenoiseSettings(t_min=0.9, t_max=0.5)
    with pytest.raises(InvalidSettings, match="temprature"):
        DenoiseSettings.from_mapping({"temprature": 1.0})


def test_defaults_come_from_the_checkpoint_then_transformers(engine: DiffusionEngine) -> None:
    resolved = engine.resolve(DenoiseSettings(max_new_tokens=10))
    assert resolved.max_new_tokens == 10
    assert resolved.max_denoising_steps == 8  # the tiny checkpoint's generation_config.json
    assert resolved.stop_token_ids == (1, 5)  # <eos> and <turn|>


def test_loading_errors_say_what_is_wrong(tmp_path: Path, engine_checkpoint: Path) -> None:
    with pytest.raises(ModelConfigError, match="neither an existing directory"):
        DiffusionEngine.from_pretrained(tmp_path / "missing")
    with pytest.raises(ModelConfigError, match=r"no config\.json"):
        DiffusionEngine.from_pretrained(tmp_path)
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelConfigError, match="'llama'"):
        DiffusionEngine.from_pretrained(other)
    with pytest.raises(ModelConfigError, match=r"float16 cannot run on the CPU"):
        DiffusionEngine.from_pretrained(engine_checkpoint, device="cpu", dtype="float16")
    with pytest.raises(ModelConfigError, match="float64"):
        DiffusionEngine.from_pretrained(engine_checkpoint, dtype="float64")


def test_hub_id_offline_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing can be found locally
    with pytest.raises(ModelConfigError, match="HF_HUB_OFFLINE=1"):
        DiffusionEngine.from_pretrained("google/diffusiongemma-26B-A4B-it")
