"""The shipped tiny calculator checkpoint: format, chat template, held-out split and accuracy floor."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

from blockpress.workers.checkpoints import TINY_CALCULATOR
from blockpress.workers.hf_compat import cache_kwargs, output_cache
from blockpress.workers.tinytrain import CALCULATOR_TOOL, held_out_problems, is_held_out
from blockpress.workers.tinytrain.data import conversation_steps, random_samples, sample_problem
from blockpress.workers.tinytrain.evaluate import last_number, parse_call

# On held_out_problems(40) with seed 0 the shipped checkpoint measured 97.5% exact answers and 100%
# well-formed calls (bench/tiny_accuracy.py's evaluation); the floors leave room for other CPUs' rounding.
ACCURACY_FLOOR = 0.85
CALL_VALIDITY_FLOOR = 0.95

CHAT_MARKERS = [
    "<|turn>",
    "<turn|>",
    "<|tool>",
    "<tool|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    '<|"|>',
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(TINY_CALCULATOR)


def test_checkpoint_is_small_and_complete() -> None:
    names = {p.name for p in TINY_CALCULATOR.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md"} <= names
    size = sum(p.stat().st_size for p in TINY_CALCULATOR.iterdir() if p.is_file())
    assert size <= 20 * 1024 * 1024, f"checkpoint is {size / 2**20:.1f} MiB"


def test_loads_as_the_real_class_with_matching_special_tokens(tokenizer: Any) -> None:
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(TINY_CALCULATOR)
    text = model.config.get_text_config()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    assert (text.pad_token_id, text.eos_token_id, text.bos_token_id) == (0, 1, 2)
    assert text.vocab_size == len(tokenizer)
    assert text.layer_types[-1] == "full_attention"
    turn_end = tokenizer.convert_tokens_to_ids("<turn|>")
    assert sorted(model.generation_config.eos_token_id) == sorted([1, turn_end])
    assert getattr(model.generation_config, "max_denoising_steps", 0) >= 4


def test_chat_markers_are_single_tokens(tokenizer: Any) -> None:
    for marker in CHAT_MARKERS:
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, marker


def test_chat_template_renders_the_contract_format(tokenizer: Any) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 37*41+12?"},
        {
            "role": "assistant",
            "tool_calls": [
                {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "37*41+12"}}}
            ],
        },
        {"role": "tool", "name": "calculator", "content": "1529"},
        {"role": "assistant", "content": "37*41+12 is 1529."},
    ]
    text = tokenizer.apply_chat_template(messages, tools=[CALCULATOR_TOOL], tokenize=False)
    assert text.startswith('<bos><|turn>system\nBe brief.<|tool>declaration:calculator{description:<|"|>')
    assert ',parameters:{type:<|"|>object<|"|>,properties:{expression:{type:<|"|>string<|"|>' in text
    assert text.endswith(
        "<tool|><turn|>\n<|turn>user\nWhat is 37*41+12?<turn|>\n"
        '<|turn>model\n<|tool_call>call:calculator{expression:<|"|>37*41+12<|"|>}<tool_call|><turn|>\n'
        "<|turn>tool\n<|tool_response>response:calculator{result:1529}<tool_response|><turn|>\n"
        "<|turn>model\n37*41+12 is 1529.<turn|>\n"
    )
    # Round trip: the tokenizer gives back exactly the rendered text.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids
    prompt = tokenizer.apply_chat_template(
        messages[:2], tools=[CALCULATOR_TOOL], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<turn|>\n<|turn>model\n")


def test_tool_result_objects_render_their_keys(tokenizer: Any) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "hi"},
        {"role": "tool", "name": "lookup", "content": {"city": "Oslo", "ok": True, "n": 3}},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert '<|tool_response>response:lookup{city:<|"|>Oslo<|"|>,ok:true,n:3}<tool_response|>' in text
    assert "<|turn>system" not in text  # no system turn without a system message or tools


def test_held_out_problems_are_never_trained_on() -> None:
    held = held_out_problems(50)
    assert held == held_out_problems(50)  # fixed for a given seed
    assert all(is_held_out(p) for p in held)
    rng = random.Random(7)
    train_keys = {sample_problem(rng).key for _ in range(3000)}
    assert not train_keys & {p.key for p in held}
    assert any(p.then_op is not None for p in held) and any(p.then_op is None for p in held)


def test_training_turns_are_what_the_evaluator_accepts() -> None:
    problem = next(p for p in held_out_problems(20) if p.then_op is not None)
    calls, *_, answer = conversation_steps(problem)
    assert parse_call(calls.target) == problem.expression
    assert last_number(answer.target) == problem.answer
    assert parse_call(calls.target + "x") is None
    assert all(s.target for s in random_samples(random.Random(0)))


@pytest.mark.slow
def test_accuracy_floor_on_held_out_problems_through_the_engine() -> None:
    # The floor is the shipped checkpoint's own level on this sample, less a margin for other CPUs'
    # float rounding: it catches a regression (engine, template, tokenizer or weights). The issue's
    # targets (90% exact, 98% well-formed on 200 problems) are measured by bench/tiny_accuracy.py.
    from blockpress.workers import DiffusionEngine
    from blockpress.workers.tinytrain.evaluate import evaluate

    engine = DiffusionEngine.from_pretrained(str(TINY_CALCULATOR), device="cpu")
    report = evaluate(engine, held_out_problems(40), seed=0)
    assert report.accuracy >= ACCURACY_FLOOR, report.summary()
    assert report.call_validity >= CALL_VALIDITY_FLOOR, report.summary()
    # The adaptive stop must fire on a trained model: canvases end well before the step limit.
    assert report.mean_steps_per_canvas < 0.75 * report.max_steps, report.summary()


def test_checkpoint_directory_is_inside_the_package() -> None:
    assert Path(TINY_CALCULATOR).parent.name == "checkpoints"


def test_training_decoder_sees_what_the_engine_decoder_sees(tokenizer: Any) -> None:
    # Each training canvas must get the logits its own prompt alone gives at inference, although the
    # trainer encodes whole conversations, padded, once for all their turns. With a sliding window shorter
    # than the padded batch it did not (evicted prompt tokens); nor would it if a later turn leaked in.
    import torch

    from blockpress.workers.tinytrain.build import build_model_config
    from blockpress.workers.tinytrain.train import _batch, _encode

    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(build_model_config(len(tokenizer))).eval()
    canvas = model.config.canvas_length
    b = _batch(tokenizer, random.Random(3), 4, canvas)
    lengths = b.mask.sum(dim=1)
    assert int(lengths.min()) < int(lengths.max())  # some rows are padded
    assert len(b.rows) > len(set(b.rows.tolist()))  # some conversations give several canvases
    with torch.no_grad():
        batched = model(**_encode(model, b), decoder_input_ids=b.targets).logits
        for i in range(len(b.targets)):
            prompt = torch.cat([b.shared[0], b.ids[b.rows[i], : b.starts[i]]]).unsqueeze(0)
            cache = output_cache(model.model.encoder(input_ids=prompt))
            positions = (prompt.shape[1] + torch.arange(canvas)).unsqueeze(0)
            alone = model(
                **cache_kwargs(cache), decoder_input_ids=b.targets[i : i + 1], decoder_position_ids=positions
            ).logits
            torch.testing.assert_close(batched[i], alone[0], atol=1e-4, rtol=1e-4)


def test_training_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    # The issue asks for a run that gives the same checkpoint from the same seed; a few steps of two runs
    # with one seed must give identical weights, and another seed different ones.
    import json

    from safetensors.torch import load_file

    from blockpress.workers.tinytrain.train import TrainSettings, train

    def run(seed: int, name: str) -> dict[str, Any]:
        train(tmp_path / name, TrainSettings(seed=seed, steps=3, batch_size=2, warmup=1))
        return load_file(tmp_path / name / "model.safetensors")

    first, again, other = run(0, "a"), run(0, "b"), run(1, "c")
    assert first.keys() == again.keys()
    assert all(bool((first[k] == again[k]).all()) for k in first)
    # (Another seed also trains another tokenizer, so even the embedding shapes may differ.)
    assert any(first[k].shape != other[k].shape or not bool((first[k] == other[k]).all()) for k in first)
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert log["settings"]["seed"] == 0 and len(log["losses_every_10"]) == 1
    assert (tmp_path / "a" / "loss.png").stat().st_size > 0


def test_noised_digits_stay_digits_and_can_come_from_their_own_canvas() -> None:
    # Digit confusion: a noised digit becomes another digit, so that a digit in the canvas is no evidence
    # of itself. With own_digits=1 the substitute is one of the same canvas's digits, the mistake a model
    # makes copying a number (64 written 66).
    import torch

    from blockpress.workers.tinytrain.train import TrainSettings, _Batch, _noise

    digits = torch.arange(10, 20)
    rows = [[10, 11, 12] + [5] * 29, [19] * 4 + [5] * 28]
    targets = torch.tensor(rows * 200)
    empty = torch.zeros(0)
    b = _Batch(empty, empty, empty, empty, empty, targets)
    is_digit = torch.isin(targets, digits)
    gen = torch.Generator().manual_seed(0)

    uniform = _noise(b, 50, digits, TrainSettings(digit_confusion=1.0), gen)
    assert bool(torch.isin(uniform[is_digit], digits).all())
    assert bool((uniform[is_digit] != targets[is_digit]).any())  # some were noised
    assert bool(torch.isin(uniform[0::2][is_digit[0::2]], torch.arange(13, 20)).any())  # from all ten digits
    assert bool((~torch.isin(uniform[~is_digit], digits)).any())  # other positions get any token

    own = _noise(b, 50, digits, TrainSettings(digit_confusion=1.0, own_digits=1.0), gen)
    assert bool(torch.isin(own[0::2][is_digit[0::2]], torch.tensor([10, 11, 12])).all())
    assert bool((own[1::2][is_digit[1::2]] == 19).all())
    assert bool((own[0::2][is_digit[0::2]] != targets[0::2][is_digit[0::2]]).any())
