"""Critiques of the compared completions: once per completion, templates checked, resume safe."""

from __future__ import annotations

from pathlib import Path

import pytest

from annotation.models import Comparison, Completion, Critique
from annotation.services.items import PairSpec, comparisons_create
from tests.conftest import make_campaign
from tests.factories import CompletionFactory, PromptFactory
from tests.training.helpers import tiny_base_model
from tests.training.loop_helpers import Recorder, make_run
from training.models import RunStatus, TrainingRun
from training.services.critiques import (
    DEFAULT_TEMPLATE,
    MAX_CRITIQUE_CHARS,
    CritiqueConfigError,
    clean_critique,
    critique_execute,
    critique_prompt,
    critique_template_check,
    quoted_spans,
)
from training.services.progress import RunCancelled


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base_model(tmp_path_factory.mktemp("critic"))


def config(model: Path, **overrides: object) -> dict[str, object]:
    values: dict[str, object] = {
        "model": str(model),
        "device": "cpu",
        "seed": 0,
        "critic_name": "tiny-critic",
        "max_new_tokens": 8,
        "temperature": 0.7,
        "batch_size": 3,
        "round_number": None,
    }
    values.update(overrides)
    return values


def compared_ids(campaign) -> set[int]:
    rows = Comparison.objects.filter(campaign=campaign).values_list(
        "completion_a_id", "completion_b_id"
    )
    return {c for row in rows for c in row}


# -- pure pieces -------------------------------------------------------------------------------


def test_default_template_is_valid_and_asks_for_the_problems() -> None:
    assert critique_template_check(DEFAULT_TEMPLATE) == DEFAULT_TEMPLATE
    assert "factual errors" in DEFAULT_TEMPLATE
    assert "unsafe" in DEFAULT_TEMPLATE


@pytest.mark.parametrize(
    ("template", "named"),
    [
        ("Is this right? {answer}", "{question}"),
        ("{question} needs an answer.", "{answer}"),
        ("{question} {answer} {critic}", "{critic}"),
        ("{question} {answer.__class__}", "{answer.__class__}"),
        ("{question} {answer[0]}", "{answer[0]}"),
        ("{question} {answer} {}", "{}"),
        ("{question} {answer!r}", "{answer}"),
        ("{question} {answer:>40}", "{answer}"),
        ("{question} {answer", "brace"),
        ("", "non-empty"),
    ],
)
def test_bad_templates_are_rejected_naming_the_placeholder(template: str, named: str) -> None:
    with pytest.raises(CritiqueConfigError) as err:
        critique_template_check(template)
    assert str(err.value).startswith("template: ")
    assert named in str(err.value)


def test_literal_braces_are_allowed_and_braces_in_the_texts_stay_text() -> None:
    template = "Q: {question}\nA: {answer}\nReply as {{json}}."
    critique_template_check(template)
    messages = [{"role": "user", "content": "What is {x}?"}]
    assert critique_prompt(template, messages, "It is {question}.") == (
        "Q: What is {x}?\nA: It is {question}.\nReply as {json}."
    )


def test_a_conversation_is_shown_turn_by_turn() -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Add 2 and 2"},
    ]
    assert critique_prompt("{question}|{answer}", messages, "5") == (
        "User: Hi\n\nAssistant: Hello\n\nUser: Add 2 and 2|5"
    )


def test_quoted_spans_point_at_exact_quotes_from_the_answer() -> None:
    answer = "Paris is the capital of Italy. Boil the water for 2 minutes."
    critique = (
        'It says "capital of Italy", which is wrong; \u201cBoil the water\u201d is fine, '
        '"of" is too short, "Rome" is not in the answer, and `capital of Italy` again.'
    )
    assert quoted_spans(critique, answer) == [
        {"start": 0 + answer.index("capital"), "end": answer.index("capital") + 16},
        {"start": answer.index("Boil"), "end": answer.index("Boil") + 14},
    ]
    assert quoted_spans("no quotes here", answer) == []


def test_clean_critique_trims_caps_and_drops_nul() -> None:
    assert clean_critique("  \n It is wrong.\x00 \n") == "It is wrong."
    assert len(clean_critique("x" * (MAX_CRITIQUE_CHARS + 50))) == MAX_CRITIQUE_CHARS
    assert clean_critique(" \n\t ") == ""


# -- the run -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_writes_one_critique_per_compared_completion_once(tiny_model: Path) -> None:
    campaign = make_campaign(comparisons=2)  # 4 compared completions
    loose = CompletionFactory(prompt=PromptFactory(campaign=campaign))  # in no comparison
    run = make_run(campaign, "critique", **config(tiny_model))
    report = Recorder()

    metrics = critique_execute(run=run, report=report)

    critiques = Critique.objects.filter(completion__prompt__campaign=campaign)
    assert sorted(critiques.values_list("completion_id", flat=True)) == sorted(
        compared_ids(campaign)
    )
    assert set(critiques.values_list("critic", flat=True)) == {"tiny-critic"}
    assert not Critique.objects.filter(completion=loose).exists()
    for critique in critiques:
        assert critique.text == critique.text.strip()
        assert critique.text
    assert [(done, total) for done, total, _ in report.calls] == [(3, 4), (4, 4)]
    assert metrics["critiques"] == 4
    assert metrics["completions"] == 4
    assert 0 < metrics["mean_length"] <= 8

    again = Recorder()
    assert critique_execute(run=run, report=again)["critiques"] == 0
    assert again.calls == []
    assert critiques.all().count() == 4  # .all(): a fresh query, not the cached rows
    # Another critic writes its own (after the first run ended: one active run per kind).
    TrainingRun.objects.filter(pk=run.pk).update(status=RunStatus.SUCCEEDED)
    other = make_run(campaign, "critique", **config(tiny_model, critic_name="second"))
    assert critique_execute(run=other, report=Recorder())["critiques"] == 4
    assert critiques.all().count() == 8


@pytest.mark.django_db
def test_a_critique_written_meanwhile_by_a_duplicate_delivery_is_not_written_twice(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.core.generation import TransformersGenerator

    campaign = make_campaign(comparisons=1)
    first, second = Completion.objects.filter(prompt__campaign=campaign).order_by("id")
    original = TransformersGenerator.generate

    def generate_while_another_worker_writes(self, *args, **kwargs):
        Critique.objects.create(completion=first, critic="tiny-critic", text="Seen.")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TransformersGenerator, "generate", generate_while_another_worker_writes)
    run = make_run(campaign, "critique", **config(tiny_model))
    assert critique_execute(run=run, report=Recorder())["critiques"] == 1
    assert Critique.objects.filter(completion=first).count() == 1
    assert Critique.objects.filter(completion=second).count() == 1


@pytest.mark.django_db
def test_a_round_critiques_only_the_comparisons_with_its_completions(tiny_model: Path) -> None:
    campaign = make_campaign(comparisons=1)  # imported, round None
    prompt = PromptFactory(campaign=campaign)
    new = CompletionFactory(prompt=prompt, round_number=2)
    previous = CompletionFactory(prompt=prompt, round_number=1)
    comparisons_create(
        campaign=campaign,
        pairs=[PairSpec(prompt_id=prompt.pk, completion_x=new.pk, completion_y=previous.pk)],
    )
    run = make_run(campaign, "critique", **config(tiny_model, round_number=2))

    metrics = critique_execute(run=run, report=Recorder())

    assert metrics["critiques"] == 2
    assert set(Critique.objects.values_list("completion_id", flat=True)) == {new.pk, previous.pk}


@pytest.mark.django_db
def test_a_bad_template_fails_before_anything_is_written(tiny_model: Path) -> None:
    campaign = make_campaign(comparisons=1)
    run = make_run(campaign, "critique", **config(tiny_model, template="Critique: {answer}"))
    with pytest.raises(CritiqueConfigError, match=r"\{question\} placeholder is missing"):
        critique_execute(run=run, report=Recorder())
    assert not Critique.objects.exists()


@pytest.mark.django_db
def test_cancel_keeps_the_finished_batch(tiny_model: Path) -> None:
    campaign = make_campaign(comparisons=2)
    run = make_run(campaign, "critique", **config(tiny_model))
    with pytest.raises(RunCancelled):
        critique_execute(run=run, report=Recorder(cancel_after=1))
    first_three = sorted(compared_ids(campaign))[:3]
    assert sorted(Critique.objects.values_list("completion_id", flat=True)) == first_three

    metrics = critique_execute(run=run, report=Recorder())
    assert metrics["critiques"] == 1
    assert Critique.objects.count() == 4


@pytest.mark.django_db
def test_model_output_is_stored_trimmed_with_its_quotes_as_spans_and_empty_replies_skipped(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.core.generation import TransformersGenerator

    campaign = make_campaign(comparisons=1)
    first, second = Completion.objects.filter(prompt__campaign=campaign).order_by("id")
    Completion.objects.filter(pk=first.pk).update(text="Paris is in Italy.")
    original = TransformersGenerator.generate

    def replies(self, prompts, **kwargs):
        out = original(self, prompts, **kwargs)
        # What the critic "said": markup and a quote for the first answer, nothing useful for
        # the second.
        out.texts = ['  <b>No:</b> "Paris is in Italy" is false.\n', " \n "]
        return out

    monkeypatch.setattr(TransformersGenerator, "generate", replies)
    run = make_run(campaign, "critique", **config(tiny_model))
    metrics = critique_execute(run=run, report=Recorder())

    critique = Critique.objects.get()
    assert critique.completion_id == first.pk
    assert critique.text == '<b>No:</b> "Paris is in Italy" is false.'  # as written
    assert critique.spans == [{"start": 0, "end": 17}]
    assert metrics["critiques"] == 1
    assert metrics["empty"] == 1
    assert not Critique.objects.filter(completion=second).exists()
