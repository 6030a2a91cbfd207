"""The JSONL reader, the import schemas and the export line builders: pure functions, no DB."""

from __future__ import annotations

import codecs
import io
import json
from datetime import UTC, datetime

import pytest

from annotation import formats
from annotation.formats import FieldError, Limits, LineError, parse_item, read_jsonl
from annotation.models import Comparison, Completion, Judgment, Prompt, Source

LIMITS = Limits(max_bytes=10_000_000, max_lines=100_000)


def read(data: bytes, limits: Limits = LIMITS) -> list[tuple[int, object]]:
    return list(read_jsonl(io.BytesIO(data), limits=limits))


def errors(data: bytes, limits: Limits = LIMITS) -> list[LineError]:
    return [value for _, value in read(data, limits) if isinstance(value, LineError)]


# -- reading ------------------------------------------------------------------------------------


def test_reader_yields_objects_with_physical_line_numbers_and_skips_blank_lines():
    rows = read(b'{"a": 1}\n\n   \n{"b": 2}\r\n{"c": 3}')
    assert rows == [(1, {"a": 1}), (4, {"b": 2}), (5, {"c": 3})]


def test_utf8_bom_is_tolerated_on_the_first_line():
    assert read(codecs.BOM_UTF8 + b'{"prompt": "hi"}\n') == [(1, {"prompt": "hi"})]


def test_bad_json_on_line_3_names_line_3_and_the_column():
    (error,) = errors(b'{"a": 1}\n{"a": 2}\n{"a": 3,, }\n{"a": 4}\n')
    assert error.line == 3
    assert error.error == "bad JSON: expecting property name enclosed in double quotes at column 9"


def test_truncated_last_line_is_reported_as_truncated():
    (error,) = errors(b'{"prompt": "one"}\n{"prompt": "tw')
    assert error.line == 2
    assert "truncated" in error.error


def test_latin1_bytes_are_rejected_with_the_byte_offsets():
    (error,) = errors('{"prompt": "ok"}\n{"prompt": "café"}\n'.encode("latin-1"))
    assert error.line == 2
    assert "not valid UTF-8 at byte 15 of the line (file byte 32)" in error.error


def test_utf16_with_bom_stops_at_line_1_and_says_utf16():
    (error,) = errors('{"prompt": "hi"}\n{"prompt": "there"}\n'.encode("utf-16"))
    assert error.line == 1
    assert error.fatal
    assert "UTF-16" in error.error


def test_utf16_without_bom_fails_on_nul_bytes():
    found = errors('{"prompt": "hi"}\n'.encode("utf-16-le"))
    assert found[0].line == 1
    assert "NUL byte" in found[0].error


def test_nul_byte_in_a_utf8_line_is_rejected():
    (error,) = errors(b'{"prompt": "a"}\n{"prompt": "a\x00b"}\n')
    assert error.line == 2
    assert "NUL byte at byte 13" in error.error


def test_escaped_nul_and_lone_surrogates_are_rejected_with_the_field():
    found = errors(b'{"prompt": "a\\u0000b"}\n{"metadata": {"k": "\\ud800"}}\n')
    assert [(e.line, e.field) for e in found] == [(1, "prompt"), (2, "metadata.k")]
    assert "NUL" in found[0].error
    assert "surrogate" in found[1].error


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_rejected(constant):
    (error,) = errors(f'{{"metadata": {{"x": {constant}}}}}\n'.encode())
    assert constant in error.error
    assert "finite" in error.error


def test_duplicate_keys_in_one_object_are_rejected():
    (error,) = errors(b'{"prompt": "a", "prompt": "b"}\n')
    assert "duplicate key 'prompt'" in error.error


def test_ten_thousand_deep_nesting_is_rejected_without_crashing():
    deep = b'{"metadata": ' + b"[" * 10_000 + b"]" * 10_000 + b"}\n"
    (error,) = errors(b'{"prompt": "ok"}\n' + deep)
    assert error.line == 2
    assert "nested deeper than 32 levels" in error.error


def test_nesting_just_past_the_cap_is_rejected_and_at_the_cap_accepted():
    limits = Limits(max_bytes=10**6, max_lines=10, max_depth=5)
    ok = b'{"a": [[[{"b": 1}]]]}\n'  # depth 5
    too_deep = b'{"a": [[[[{"b": 1}]]]]}\n'  # depth 6
    assert errors(ok, limits) == []
    (error,) = errors(too_deep, limits)
    assert error.field == "a[0][0][0][0]"


def test_a_line_that_is_not_an_object_is_rejected():
    (error,) = errors(b'["prompt"]\n')
    assert "must be a JSON object" in error.error


def test_too_many_bytes_stops_with_a_fatal_error_naming_the_line():
    data = b'{"prompt": "x"}\n' * 10
    found = errors(data, Limits(max_bytes=len(b'{"prompt": "x"}\n') * 3 + 5, max_lines=100))
    assert [(e.line, e.fatal) for e in found] == [(4, True)]
    assert "larger than" in found[0].error


def test_too_many_lines_stops_with_a_fatal_error():
    found = errors(b"{}\n" * 5, Limits(max_bytes=10**6, max_lines=3))
    assert [(e.line, e.fatal) for e in found] == [(4, True)]


def test_an_overlong_line_is_skipped_and_reading_goes_on():
    limits = Limits(max_bytes=10**6, max_lines=100, max_line_bytes=50)
    data = b'{"prompt": "' + b"x" * 200 + b'"}\n{"prompt": "fine"}\n'
    rows = read(data, limits)
    assert isinstance(rows[0][1], LineError)
    assert "longer than 50 bytes" in rows[0][1].error
    assert rows[1] == (2, {"prompt": "fine"})


class ReadlineOnly(io.RawIOBase):
    """A stream that only allows bounded readline calls, like a well-behaved upload."""

    def __init__(self, data: bytes) -> None:
        self._buffer = io.BytesIO(data)
        self.largest_request = 0

    def readline(self, size: int | None = -1) -> bytes:
        assert size is not None, "unbounded readline would load a whole line"
        assert size > 0, "unbounded readline would load a whole line"
        self.largest_request = max(self.largest_request, size)
        return self._buffer.readline(size)

    def read(self, size: int = -1) -> bytes:
        raise AssertionError("read() would load the whole upload")


def test_reader_only_makes_bounded_readline_calls():
    stream = ReadlineOnly(b'{"prompt": "a"}\n' * 1000)
    limits = Limits(max_bytes=10**6, max_lines=10**4, max_line_bytes=1024)
    assert len(list(read_jsonl(stream, limits=limits))) == 1000
    assert stream.largest_request == 1025


# -- schema -------------------------------------------------------------------------------------


def test_prompt_string_becomes_one_user_message_with_defaults():
    item = parse_item({"prompt": "Hi?"}, kind="prompts")
    assert item == formats.PromptItem(messages=[{"role": "user", "content": "Hi?"}])


def test_multi_turn_prompt_with_id_split_and_metadata():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye?"},
    ]
    item = parse_item(
        {"prompt": messages, "id": "p1", "split": "eval", "metadata": {"t": 1}}, kind="prompts"
    )
    assert item.messages == messages
    assert (item.external_id, item.split, item.metadata) == ("p1", "eval", {"t": 1})


@pytest.mark.parametrize(
    ("obj", "kind", "field", "fragment"),
    [
        ({"id": "x"}, "prompts", "prompt", "is required"),
        ({"prompt": 42}, "prompts", "prompt", "not a number"),
        ({"prompt": ""}, "prompts", "prompt", "must not be empty"),
        ({"prompt": []}, "prompts", "prompt", "must not be empty"),
        ({"prompt": [{"role": "bot", "content": "x"}]}, "prompts", "prompt[0].role", "one of"),
        ({"prompt": [{"role": "user"}]}, "prompts", "prompt[0].content", "is required"),
        (
            {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "prompts",
            "prompt[1].role",
            "last message must be 'user'",
        ),
        ({"prompt": "x", "id": 7}, "prompts", "id", "must be a string, not a number"),
        ({"prompt": "x", "split": "test"}, "prompts", "split", "train, eval"),
        ({"prompt": "x", "metadata": []}, "prompts", "metadata", "must be an object"),
        ({"prompt": "x", "promt": "y"}, "prompts", "promt", "unknown field"),
        ({"prompt": "x"}, "candidates", "completions", "is required"),
        ({"prompt": "x", "completions": "a"}, "candidates", "completions", "must be a list"),
        ({"prompt": "x", "completions": [{"txt": "a"}]}, "candidates", "completions[0].txt", ""),
        ({"prompt": "x", "completions": [{}]}, "candidates", "completions[0].text", "required"),
        (
            {"prompt": "x", "completions": ["a", "a"]},
            "candidates",
            "completions[1].text",
            "repeats",
        ),
        (
            {"prompt": "x", "completions": [{"text": "abc", "critique": {"spans": []}}]},
            "candidates",
            "completions[0].critique.text",
            "is required",
        ),
        (
            {
                "prompt": "x",
                "completions": [
                    {"text": "abc", "critique": {"text": "t", "spans": [{"start": 1, "end": 9}]}}
                ],
            },
            "candidates",
            "completions[0].critique.spans[0]",
            "the completion's length",
        ),
        (
            {
                "prompt": "x",
                "completions": [
                    {"text": "abc", "critique": {"text": "t", "spans": [{"start": True, "end": 2}]}}
                ],
            },
            "candidates",
            "completions[0].critique.spans[0]",
            "integers",
        ),
        ({"prompt": "x", "a": "y"}, "pairs", "b", "is required"),
        ({"prompt": "x", "a": "y", "b": "y"}, "pairs", "b", "same text as a"),
        ({"prompt": "x", "a": "y", "b": "z", "gold": "both"}, "pairs", "gold", "a, b, tie"),
        ({"prompt": "x", "a": ["y"], "b": "z"}, "pairs", "a", "not a list"),
    ],
)
def test_schema_errors_name_the_field(obj, kind, field, fragment):
    with pytest.raises(FieldError) as caught:
        parse_item(obj, kind=kind)
    assert caught.value.field == field
    assert fragment in caught.value.error


def test_field_length_caps():
    with pytest.raises(FieldError) as caught:
        parse_item({"prompt": "x" * (formats.MAX_TEXT_CHARS + 1)}, kind="prompts")
    assert "longer than 100000 characters" in caught.value.error
    with pytest.raises(FieldError):
        parse_item({"prompt": "x", "id": "i" * 201}, kind="prompts")
    with pytest.raises(FieldError) as caught:
        parse_item({"prompt": "x", "metadata": {"k": "v" * 20_000}}, kind="prompts")
    assert caught.value.field == "metadata"


def test_candidates_with_critiques_in_both_shapes():
    item = parse_item(
        {
            "prompt": "Why?",
            "completions": [
                "plain",
                {"text": "with source", "source": "m1", "id": "c2", "critique": "Too short."},
                {
                    "text": "spanned",
                    "critique": {
                        "critic": "cg",
                        "text": "Wrong.",
                        "spans": [{"start": 0, "end": 4}],
                    },
                },
            ],
        },
        kind="candidates",
    )
    assert isinstance(item, formats.CandidatesItem)
    plain, sourced, spanned = item.completions
    assert plain == formats.CompletionItem(text="plain")
    assert (sourced.source, sourced.external_id) == ("m1", "c2")
    assert sourced.critique == formats.CritiqueItem(formats.DEFAULT_CRITIC, "Too short.", [])
    assert spanned.critique == formats.CritiqueItem("cg", "Wrong.", [{"start": 0, "end": 4}])


def test_pair_with_gold():
    item = parse_item(
        {"prompt": "x", "a": {"text": "A", "source": "m"}, "b": "B", "gold": "b"}, kind="pairs"
    )
    assert isinstance(item, formats.PairItem)
    assert (item.a.text, item.a.source, item.b.text, item.gold) == ("A", "m", "B", "b")


# -- export -------------------------------------------------------------------------------------


def make_judgment(*, choice: str, strength: int | None = None, **extra: object) -> Judgment:
    """An unsaved judgment with its relations filled in, as the export selector loads them."""
    source = Source(name="model-x")
    prompt = Prompt(
        pk=7,
        external_id="p7",
        split="train",
        messages=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
    )
    a = Completion(pk=11, prompt=prompt, source=source, text="Hello there!", external_id="c1")
    b = Completion(pk=12, prompt=prompt, source=Source(name="model-y"), text="go away")
    comparison = Comparison(pk=3, prompt=prompt, completion_a=a, completion_b=b, gold_choice="a")
    from django.contrib.auth.models import User

    fields = {
        "left_was_a": False,
        "critique_shown": True,
        "decision_ms": 4200,
        "guidelines_version": 2,
        "aspects": {"helpfulness": "a"},
        "reason_tags": ["clearer"],
        "flags": [],
        "rationale": "A is polite.",
        **extra,
    }
    judgment = Judgment(
        pk=99,
        comparison=comparison,
        rater=User(username="rater7"),
        choice=choice,
        strength=strength,
        **fields,
    )
    judgment.created_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    return judgment


def test_trl_record_puts_the_winner_in_chosen_and_maps_strength_to_margin():
    record = formats.trl_record(make_judgment(choice="b", strength=3))
    assert record == {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
        "chosen": [{"role": "assistant", "content": "go away"}],
        "rejected": [{"role": "assistant", "content": "Hello there!"}],
        "margin": 2.0,
    }


@pytest.mark.parametrize(("strength", "margin"), [(None, 0.0), (1, 0.0), (2, 1.0), (5, 4.0)])
def test_margin_is_strength_minus_one_and_zero_without_strength(strength, margin):
    assert formats.trl_record(make_judgment(choice="a", strength=strength))["margin"] == margin


@pytest.mark.parametrize("choice", ["tie", "both_bad"])
def test_ties_and_both_bad_are_skipped_in_trl_and_text_but_kept_in_full(choice):
    judgment = make_judgment(choice=choice)
    assert formats.trl_record(judgment) is None
    assert formats.text_record(judgment) is None
    assert formats.full_record(judgment)["choice"] == choice


def test_text_record_renders_the_prompt_in_hh_format():
    record = formats.text_record(make_judgment(choice="a", strength=2))
    assert record == {
        "prompt": "\n\nSystem: Be kind.\n\nHuman: Hi?\n\nAssistant:",
        "chosen": "Hello there!",
        "rejected": "go away",
        "margin": 1.0,
    }


def test_full_record_keeps_everything():
    record = formats.full_record(make_judgment(choice="a", strength=2))
    assert record == {
        "judgment_id": 99,
        "comparison_id": 3,
        "prompt_id": 7,
        "prompt_external_id": "p7",
        "split": "train",
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
        "completion_a": {
            "id": 11,
            "external_id": "c1",
            "text": "Hello there!",
            "source": "model-x",
        },
        "completion_b": {"id": 12, "external_id": "", "text": "go away", "source": "model-y"},
        "choice": "a",
        "strength": 2,
        "margin": 1.0,
        "aspects": {"helpfulness": "a"},
        "reason_tags": ["clearer"],
        "rationale": "A is polite.",
        "flags": [],
        "rater": "rater7",
        "left_was_a": False,
        "critique_shown": True,
        "decision_ms": 4200,
        "guidelines_version": 2,
        "created_at": "2026-01-02T03:04:05+00:00",
        "gold": "a",
    }


def test_export_lines_stay_one_per_physical_line_with_unicode_line_separators():
    judgment = make_judgment(choice="a", rationale="one\u2028two\u2029three\x85four\nfive")
    line = formats.export_line(formats.full_record(judgment))
    text = line.decode("utf-8")
    assert text.endswith("\n")
    assert len(text.splitlines()) == 1
    assert json.loads(text)["rationale"] == "one\u2028two\u2029three\x85four\nfive"


def test_export_chunks_groups_lines_without_losing_any():
    judgments = [make_judgment(choice="a") for _ in range(50)] + [make_judgment(choice="tie")]
    chunks = list(formats.export_chunks(judgments, fmt="trl", chunk_bytes=1000))
    assert len(chunks) > 1
    lines = b"".join(chunks).decode().splitlines()
    assert len(lines) == 50
    assert all(json.loads(line)["chosen"][0]["content"] == "Hello there!" for line in lines)


def test_a_file_of_another_kind_gets_a_hint_naming_the_right_kind():
    with pytest.raises(FieldError) as caught:
        parse_item({"prompt": "x", "completions": ["a"]}, kind="prompts")
    assert caught.value.field == "completions"
    assert caught.value.error == "belongs to the 'candidates' kind, but this import is 'prompts'"
    with pytest.raises(FieldError) as caught:
        parse_item({"prompt": "x", "a": "y", "b": "z"}, kind="candidates")
    assert "'pairs' kind" in caught.value.error


def test_numbers_too_large_for_a_float_are_rejected():
    (error,) = errors(b'{"metadata": {"x": 1e400}}\n')
    assert error.field == "metadata.x"
    assert error.error == "number is out of range"


def test_the_last_user_turn_must_say_something():
    with pytest.raises(FieldError) as caught:
        parse_item({"prompt": [{"role": "user", "content": "  "}]}, kind="prompts")
    assert caught.value.field == "prompt[0].content"
