"""JSONL import through the service: what gets written, and that a bad file writes nothing."""

from __future__ import annotations

import io
import json

import pytest

from annotation.exceptions import ImportRejected
from annotation.models import (
    CampaignStatus,
    Comparison,
    Completion,
    Critique,
    Prompt,
    Slot,
    Source,
)
from annotation.services.imports import BATCH_LINES, ImportReport, import_jsonl
from tests.annotation.test_formats import ReadlineOnly
from tests.factories import CampaignFactory, PromptFactory

MODELS = (Prompt, Completion, Comparison, Slot, Critique, Source)


def jsonl(*rows: object) -> io.BytesIO:
    return io.BytesIO(b"".join(json.dumps(row).encode() + b"\n" for row in rows))


def counts() -> dict[str, int]:
    return {model.__name__: model.objects.count() for model in MODELS}


def candidates_row(n: int, *, completions: int = 3, **extra: object) -> dict[str, object]:
    return {
        "prompt": f"Question {n}?",
        "completions": [
            {"text": f"Answer {n}.{i}", "source": f"model-{i}"} for i in range(completions)
        ],
        **extra,
    }


def rejected(campaign, data: bytes | io.BytesIO, kind: str = "candidates") -> ImportRejected:
    stream = data if isinstance(data, io.BytesIO) else io.BytesIO(data)
    before = counts()
    with pytest.raises(ImportRejected) as caught:
        import_jsonl(campaign=campaign, stream=stream, kind=kind)
    assert counts() == before, "a rejected import must write nothing"
    return caught.value


@pytest.fixture
def campaign(db):
    return CampaignFactory(overlap=2, status=CampaignStatus.DRAFT)


# -- what a good file writes --------------------------------------------------------------------


def test_candidates_become_prompts_completions_critiques_and_all_pairs(campaign):
    rows = [candidates_row(n) for n in range(4)]
    rows[1]["completions"][0]["critique"] = {
        "critic": "critic-x",
        "text": "Too vague.",
        "spans": [{"start": 0, "end": 6}],
    }
    rows[2]["completions"][2]["critique"] = "Wrong number."
    rows[3].update(id="q3", split="eval", metadata={"topic": "t"})

    report = import_jsonl(campaign=campaign, stream=jsonl(*rows), kind="candidates")

    assert report == ImportReport(prompts=4, completions=12, comparisons=12, critiques=2)
    assert Slot.objects.filter(campaign=campaign).count() == 12 * 2  # overlap 2
    q3 = Prompt.objects.get(campaign=campaign, external_id="q3")
    assert (q3.split, q3.metadata) == ("eval", {"topic": "t"})
    assert q3.messages == [{"role": "user", "content": "Question 3?"}]
    critique = Critique.objects.get(critic="critic-x")
    assert critique.completion.text == "Answer 1.0"
    assert critique.spans == [{"start": 0, "end": 6}]
    assert Critique.objects.get(text="Wrong number.").critic == "imported-critic"
    assert set(Source.objects.values_list("name", flat=True)) == {"model-0", "model-1", "model-2"}
    # Every comparison pairs two completions of the same prompt, in canonical order.
    for comparison in Comparison.objects.select_related("completion_a", "completion_b"):
        assert comparison.completion_a.prompt_id == comparison.prompt_id
        assert comparison.completion_b.prompt_id == comparison.prompt_id
        assert comparison.completion_a_id < comparison.completion_b_id


def test_random_k_builds_k_pairs_per_prompt_reproducibly_with_a_seed(db):
    rows = [candidates_row(n, completions=5) for n in range(6)]

    def chosen_pairs() -> set[tuple[str, str]]:
        target = CampaignFactory()
        report = import_jsonl(
            campaign=target,
            stream=jsonl(*rows),
            kind="candidates",
            strategy="random_k",
            k=2,
            seed=42,
        )
        assert report.comparisons == 6 * 2
        return {
            (c.completion_a.text, c.completion_b.text)
            for c in Comparison.objects.filter(campaign=target).select_related(
                "completion_a", "completion_b"
            )
        }

    assert chosen_pairs() == chosen_pairs()


def test_completions_without_a_source_get_the_default_source(campaign):
    row = {"prompt": "Hi", "completions": ["one", {"text": "two"}]}
    import_jsonl(campaign=campaign, stream=jsonl(row), kind="candidates", source_name_default="v1")
    assert set(Completion.objects.values_list("source__name", flat=True)) == {"v1"}


def test_pairs_keep_gold_in_canonical_terms(campaign):
    rows = [
        {"prompt": "P1", "a": {"text": "good", "source": "m1"}, "b": "bad", "gold": "a"},
        {"prompt": "P2", "a": "x", "b": "y", "id": "pair-2"},
    ]
    report = import_jsonl(campaign=campaign, stream=jsonl(*rows), kind="pairs")
    assert report == ImportReport(prompts=2, completions=4, comparisons=2, critiques=0)
    first = Comparison.objects.select_related("completion_a").get(prompt__messages__0__content="P1")
    winner = first.completion_a if first.gold_choice == "a" else first.completion_b
    assert winner.text == "good"
    assert Comparison.objects.get(prompt__external_id="pair-2").gold_choice == ""


def test_prompts_only_import_writes_no_completions(campaign):
    rows = [{"prompt": "A?"}, {"prompt": [{"role": "user", "content": "B?"}], "id": "b"}]
    report = import_jsonl(campaign=campaign, stream=jsonl(*rows), kind="prompts")
    assert report == ImportReport(prompts=2)
    assert counts()["Completion"] == 0


def test_import_reads_the_stream_with_bounded_readline_calls_only(campaign):
    data = b"".join(json.dumps(candidates_row(n)).encode() + b"\n" for n in range(20))
    stream = ReadlineOnly(data)
    report = import_jsonl(campaign=campaign, stream=stream, kind="candidates")
    assert report.prompts == 20
    assert 0 < stream.largest_request <= 8 * 1024 * 1024 + 1


# -- what a bad file writes: nothing ------------------------------------------------------------

GOOD = json.dumps(candidates_row(0)).encode() + b"\n" + json.dumps(candidates_row(1)).encode()

BAD_FILES = {
    "truncated line": (GOOD + b'\n{"prompt": "Q", "completions": ["a", "b', 3, "", "truncated"),
    "bad JSON on line 3": (GOOD + b'\n{"prompt": "Q",, "completions": []}\n', 3, "", "bad JSON"),
    "Latin-1 bytes": (
        GOOD + b'\n{"prompt": "caf\xe9", "completions": ["a", "b"]}\n',
        3,
        "",
        "not valid UTF-8",
    ),
    "UTF-16": (
        json.dumps(candidates_row(0)).encode("utf-16") + b"\n",
        1,
        "",
        "UTF-16",
    ),
    "NUL bytes": (GOOD + b'\n{"prompt": "Q\x00", "completions": ["a", "b"]}\n', 3, "", "NUL"),
    "10k-deep nesting": (
        GOOD + b'\n{"prompt": "Q", "metadata": ' + b"[" * 10_000 + b"]" * 10_000 + b"}\n",
        3,
        "",
        "nested deeper",
    ),
    "missing field": (GOOD + b'\n{"prompt": "Q"}\n', 3, "completions", "is required"),
    "wrong type": (
        GOOD + b'\n{"prompt": "Q", "completions": [{"text": 5}]}\n',
        3,
        "completions[0].text",
        "must be a string, not a number",
    ),
    "NaN": (
        GOOD + b'\n{"prompt": "Q", "metadata": {"x": NaN}, "completions": ["a"]}\n',
        3,
        "",
        "NaN",
    ),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_is_rejected_naming_the_line_and_writes_nothing(campaign, name):
    data, line, field, fragment = BAD_FILES[name]
    error = rejected(campaign, data)
    assert error.errors[0]["line"] == line
    assert error.errors[0]["field"] == field
    assert fragment in error.errors[0]["error"]
    assert f"Line {line}" in error.message
    assert "Nothing was imported" in error.message


def test_too_many_bytes_is_rejected_and_writes_nothing(campaign, settings):
    settings.IMPORT_MAX_BYTES = len(GOOD) - 10
    error = rejected(campaign, GOOD + b"\n")
    assert error.errors == [
        {"line": 2, "field": "", "error": f"the file is larger than {len(GOOD) - 10} bytes"}
    ]


def test_too_many_lines_is_rejected(campaign, settings):
    settings.IMPORT_MAX_LINES = 1
    error = rejected(campaign, GOOD + b"\n")
    assert error.errors[0]["line"] == 2
    assert "more than 1 lines" in error.errors[0]["error"]


def test_an_error_after_several_written_batches_still_leaves_nothing(campaign):
    rows = [candidates_row(n, completions=2) for n in range(2 * BATCH_LINES + 10)]
    rows.append({"prompt": "last", "completions": "oops"})
    error = rejected(campaign, jsonl(*rows))
    assert error.errors == [
        {
            "line": 2 * BATCH_LINES + 11,
            "field": "completions",
            "error": "must be a list, not a string",
        }
    ]


def test_errors_are_collected_from_the_whole_file_up_to_fifty(campaign):
    rows = [{"prompt": "Q", "completions": []} if n % 2 else candidates_row(n) for n in range(130)]
    error = rejected(campaign, jsonl(*rows))
    assert len(error.errors) == 50
    assert [e["line"] for e in error.errors[:3]] == [2, 4, 6]
    assert "(and 49 more)" in error.message


def test_duplicate_prompt_ids_in_one_file_name_both_lines(campaign):
    rows = [candidates_row(0, id="x"), candidates_row(1, id="y"), candidates_row(2, id="x")]
    error = rejected(campaign, jsonl(*rows))
    assert error.errors == [{"line": 3, "field": "id", "error": "id 'x' repeats line 1"}]


def test_a_prompt_id_already_in_the_campaign_is_rejected(campaign):
    PromptFactory(campaign=campaign, external_id="taken")
    error = rejected(campaign, jsonl(candidates_row(0), candidates_row(1, id="taken")))
    assert error.errors[0]["line"] == 2
    assert "already in this campaign" in error.errors[0]["error"]


def test_the_same_prompt_id_in_another_campaign_is_fine(campaign):
    PromptFactory(campaign=CampaignFactory(), external_id="shared")
    report = import_jsonl(
        campaign=campaign, stream=jsonl(candidates_row(0, id="shared")), kind="candidates"
    )
    assert report.prompts == 1


def test_duplicate_completion_ids_are_rejected_within_a_line_and_across_lines(campaign):
    one = {"prompt": "A", "completions": [{"text": "a", "id": "c1"}, {"text": "b", "id": "c1"}]}
    error = rejected(campaign, jsonl(one))
    assert error.errors[0]["field"] == "completions[1].id"
    two = {"prompt": "B", "a": {"text": "a", "id": "c9"}, "b": "b"}
    three = {"prompt": "C", "a": "c", "b": {"text": "d", "id": "c9"}}
    error = rejected(campaign, jsonl(two, three), kind="pairs")
    assert error.errors == [
        {"line": 2, "field": "b.id", "error": "completion id 'c9' is used twice (first on line 1)"}
    ]


def test_an_empty_file_is_rejected(campaign):
    error = rejected(campaign, b"\n\n")
    assert error.errors[0]["error"] == "The file has no records."


def test_an_archived_campaign_takes_no_import(db):
    archived = CampaignFactory(status=CampaignStatus.ARCHIVED)
    error = rejected(archived, jsonl(candidates_row(0)))
    assert "archived" in error.message


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"kind": "rows"}, "kind"), ({"strategy": "best"}, "strategy"), ({"k": 0}, "k")],
)
def test_bad_options_are_rejected_before_reading(campaign, kwargs, field):
    options = {"kind": "candidates", **kwargs}
    with pytest.raises(ImportRejected) as caught:
        import_jsonl(campaign=campaign, stream=jsonl(candidates_row(0)), **options)
    assert caught.value.errors[0]["field"] == field


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_imports_of_the_same_ids_at_once_one_wins_and_the_other_is_rejected():
    import threading

    from django.db import connection

    target = CampaignFactory()
    data = b"".join(
        json.dumps(candidates_row(n, id=f"same-{n}")).encode() + b"\n" for n in range(50)
    )
    barrier = threading.Barrier(2)
    outcomes: list[object] = []

    def run() -> None:
        try:
            barrier.wait()
            outcomes.append(
                import_jsonl(campaign=target, stream=io.BytesIO(data), kind="candidates")
            )
        except ImportRejected as exc:
            outcomes.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(type(o).__name__ for o in outcomes) == ["ImportRejected", "ImportReport"]
    assert Prompt.objects.filter(campaign=target).count() == 50
    assert Comparison.objects.filter(campaign=target).count() == 50 * 3
