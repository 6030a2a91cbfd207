"""Reading the JSONL formats, clear errors for bad lines, and collation into tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from training.core.data import (
    DataError,
    Demonstration,
    PreferencePair,
    PromptItem,
    collate_pairs,
    collate_prompts,
    collate_sft,
    collate_unpaired,
    read_preference_jsonl,
    read_prompt_jsonl,
    read_sft_jsonl,
    read_unpaired_jsonl,
    render_prompt,
    split_anthropic,
    unpair,
)
from training.core.modeling import build_tiny_tokenizer

USER = [{"role": "user", "content": "Hi?"}]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tiny_tokenizer()


def write_lines(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_reads_standard_conversational_and_full_export_formats(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away.", "margin": 2},
            {
                "prompt": USER,
                "chosen": [{"role": "assistant", "content": "Hello."}],
                "rejected": [{"role": "assistant", "content": "No."}],
                "weight": 0.5,
            },
            {"prompt": USER, "completion_a": "A", "completion_b": "B", "choice": "b"},
            {"prompt": USER, "completion_a": "A", "completion_b": "B", "choice": "tie"},
            {"prompt": USER, "completion_a": "A", "completion_b": "B", "choice": "both_bad"},
            "",
        ],
    )
    pairs = read_preference_jsonl(path)
    assert pairs == [
        PreferencePair(USER, "Hello.", "Go away.", margin=2.0),
        PreferencePair(USER, "Hello.", "No.", weight=0.5),
        PreferencePair(USER, "B", "A", label=1.0),
        PreferencePair(USER, "A", "B", label=0.5),
    ]


def test_anthropic_text_prompts_are_split_into_turns(tmp_path: Path) -> None:
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"
    assert split_anthropic(text) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    implicit = write_lines(
        tmp_path / "hh.jsonl",
        [{"chosen": text + " Fine, thanks.", "rejected": text + " Leave me alone."}],
    )
    (pair,) = read_preference_jsonl(implicit)
    assert pair.prompt[-1] == {"role": "user", "content": "How are you?"}
    assert (pair.chosen, pair.rejected) == ("Fine, thanks.", "Leave me alone.")


def test_implicit_conversational_pairs_share_the_prompt(tmp_path: Path) -> None:
    conv = [*USER, {"role": "assistant", "content": "X"}]
    other = [*USER, {"role": "assistant", "content": "Y"}]
    (pair,) = read_preference_jsonl(
        write_lines(tmp_path / "c.jsonl", [{"chosen": conv, "rejected": other}])
    )
    assert pair == PreferencePair(USER, "X", "Y")


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("{not json", "<line>"),
        ({"prompt": "Hi", "chosen": "a"}, "rejected"),
        ({"prompt": "Hi", "chosen": "a", "rejected": "b", "weight": "heavy"}, "weight"),
        ({"prompt": "Hi", "chosen": "a", "rejected": "b", "margin": float("nan")}, "margin"),
        ({"prompt": "Hi", "chosen": "a", "rejected": "b", "weight": float("nan")}, "weight"),
        ({"prompt": "Hi", "chosen": "a", "rejected": "b", "weight": float("inf")}, "weight"),
        ({"prompt": "Hi", "chosen": "a", "rejected": "b", "weight": -0.5}, "weight"),
        ({"prompt": "Hi", "chosen": "a", "rejected": "b", "weight": True}, "weight"),
        (
            {"prompt": "Hi", "completion_a": "a", "completion_b": "b", "choice": "a", "weight": -1},
            "weight",
        ),
        (
            {"prompt": [{"role": "user", "content": 3}], "chosen": "a", "rejected": "b"},
            "prompt[0].content",
        ),
        ({"prompt": "Hi", "completion_a": "a", "completion_b": "b", "choice": "c"}, "choice"),
        ({"prompt": "Hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "chosen"),
        ({"chosen": "a", "rejected": "b"}, "prompt"),
    ],
)
def test_bad_line_names_file_line_and_field(tmp_path: Path, line: Any, field: str) -> None:
    good = {"prompt": "Hi", "chosen": "a", "rejected": "b"}
    path = write_lines(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(DataError) as info:
        read_preference_jsonl(path)
    assert (info.value.line, info.value.field) == (2, field)
    assert "bad.jsonl, line 2" in str(info.value)
    assert repr(field) in str(info.value)


def test_weight_defaults_to_one_and_zero_is_kept(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "w.jsonl",
        [
            {"prompt": "Hi?", "chosen": "a", "rejected": "b"},
            {"prompt": "Hi?", "chosen": "a", "rejected": "b", "weight": None},
            {"prompt": "Hi?", "chosen": "a", "rejected": "b", "weight": 0},
            {
                "prompt": USER,
                "completion_a": "A",
                "completion_b": "B",
                "choice": "b",
                "weight": 0.25,
            },
        ],
    )
    assert [p.weight for p in read_preference_jsonl(path)] == [1.0, 1.0, 0.0, 0.25]
    bad = write_lines(
        tmp_path / "u.jsonl",
        [{"prompt": "Hi?", "completion": "a", "label": True, "weight": -2}],
    )
    with pytest.raises(DataError, match=r"u.jsonl, line 1, field 'weight': must not be negative"):
        read_unpaired_jsonl(bad)


def test_prompt_sft_and_unpaired_readers(tmp_path: Path) -> None:
    prompts = read_prompt_jsonl(write_lines(tmp_path / "q.jsonl", [{"prompt": "Hi?", "id": 4}]))
    assert prompts == [PromptItem(USER, {"id": 4})]

    sft = read_sft_jsonl(
        write_lines(
            tmp_path / "s.jsonl",
            [
                {"prompt": "Hi?", "completion": "Hello."},
                {"messages": [*USER, {"role": "assistant", "content": "Hey."}]},
                {"prompt": "Hi?", "chosen": "Yo.", "rejected": "No."},
            ],
        )
    )
    assert sft == [
        Demonstration(USER, "Hello."),
        Demonstration(USER, "Hey."),
        Demonstration(USER, "Yo."),
    ]
    with pytest.raises(DataError, match="line 1, field 'messages'"):
        read_sft_jsonl(write_lines(tmp_path / "s2.jsonl", [{"messages": USER}]))

    unpaired = read_unpaired_jsonl(
        write_lines(
            tmp_path / "u.jsonl",
            [
                {"prompt": "Hi?", "completion": "Hello.", "label": True},
                {"prompt": "Hi?", "chosen": "Good.", "rejected": "Bad."},
            ],
        )
    )
    assert [(u.completion, u.desirable) for u in unpaired] == [
        ("Hello.", True),
        ("Good.", True),
        ("Bad.", False),
    ]
    with pytest.raises(DataError, match="field 'label'"):
        read_unpaired_jsonl(
            write_lines(tmp_path / "u2.jsonl", [{"prompt": "x", "completion": "y", "label": 1}])
        )
    assert unpair([PreferencePair(USER, "a", "b", label=0.5)]) == []


def test_render_prompt_uses_the_chat_template_or_plain_roles(tokenizer: Any) -> None:
    assert (
        render_prompt(tokenizer, USER) == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    )
    plain = build_tiny_tokenizer()
    plain.chat_template = None
    assert render_prompt(plain, USER) == "user: Hi?\nassistant:"


def test_collate_pairs_masks_completion_tokens_and_appends_eos(tokenizer: Any) -> None:
    pairs = [
        PreferencePair(USER, "Hello there.", "No.", margin=1.0, weight=2.0, label=0.5),
        PreferencePair(
            [{"role": "user", "content": "A much longer question here?"}], "Yes.", "Maybe so."
        ),
    ]
    batch = collate_pairs(tokenizer, pairs, max_length=64, max_prompt_length=32)
    assert batch.input_ids.shape[0] == 4
    assert batch.num_pairs == 2
    assert batch.margin.tolist() == [1.0, 0.0]
    assert batch.weight.tolist() == [2.0, 1.0]
    assert batch.label.tolist() == [0.5, 1.0]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for row, text in enumerate(["Hello there.", "Yes.", "No.", "Maybe so."]):  # chosen rows first
        ids = batch.input_ids[row][batch.completion_mask[row].bool()].tolist()
        assert ids[-1] == eos
        assert tokenizer.decode(ids[:-1]) == text
        real = batch.attention_mask[row].bool()
        # right padding: real tokens first, then only pads
        n = int(real.sum())
        assert real[:n].all()
        assert not real[n:].any()
        assert (batch.input_ids[row][n:] == pad).all()
        assert not (batch.completion_mask[row].bool() & ~real).any()


def test_collate_truncates_prompt_from_the_left_and_completion_from_the_right(
    tokenizer: Any,
) -> None:
    long_prompt = [
        {"role": "user", "content": "one two three four five six seven eight nine ten " * 3}
    ]
    demo = Demonstration(long_prompt, "The cat sat on the mat. " * 5)
    batch = collate_sft(tokenizer, [demo], max_length=24, max_prompt_length=10)
    assert batch.input_ids.shape == (1, 24)
    prompt_ids = batch.input_ids[0][~batch.completion_mask[0].bool()].tolist()
    full_prompt = tokenizer(render_prompt(tokenizer, long_prompt), add_special_tokens=False)[
        "input_ids"
    ]
    assert prompt_ids == full_prompt[-10:]  # the end of the prompt (the generation cue) is kept
    completion = batch.input_ids[0][batch.completion_mask[0].bool()].tolist()
    full_completion = tokenizer(demo.completion, add_special_tokens=False)["input_ids"]
    assert completion == full_completion[:14]  # cut from the right: no EOS
    assert tokenizer.eos_token_id not in completion


def test_collate_prompts_is_left_padded(tokenizer: Any) -> None:
    ids, mask = collate_prompts(
        tokenizer, [PromptItem(USER, {}), [{"role": "user", "content": "A longer one?"}]], 64
    )
    assert mask[:, -1].all()  # every row's last position is a real token
    assert not mask[0, 0]
    assert (ids[0][~mask[0].bool()] == tokenizer.pad_token_id).all()


def test_collate_unpaired_carries_flags_and_weights(tokenizer: Any) -> None:
    from training.core.data import UnpairedExample

    batch = collate_unpaired(
        tokenizer,
        [UnpairedExample(USER, "Yes.", True, 2.0), UnpairedExample(USER, "No.", False)],
        max_length=32,
        max_prompt_length=16,
    )
    assert batch.desirable.tolist() == [True, False]
    assert torch.equal(batch.weight, torch.tensor([2.0, 1.0]))
