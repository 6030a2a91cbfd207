"""Prompts, completions, critiques and comparisons: validation and the canonical pair."""

from __future__ import annotations

import random

import pytest
from django.db import IntegrityError, transaction

from annotation.exceptions import AnnotationError
from annotation.models import Comparison, Completion, Prompt, Slot, Source, SourceKind
from annotation.services.items import (
    MAX_MESSAGE_CHARS,
    PairingStrategy,
    PairSpec,
    choose_pairs,
    clean_messages,
    comparisons_build,
    comparisons_create,
    completion_create,
    critique_create,
    prompt_create,
    source_get_or_create,
)
from tests.conftest import make_campaign
from tests.factories import CompletionFactory, PromptFactory

pytestmark = pytest.mark.django_db


# -- messages -----------------------------------------------------------------------------------


def test_clean_messages_keeps_a_multi_turn_conversation():
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?", "name": "dropped"},
    ]

    cleaned = clean_messages(conversation)

    assert cleaned == [{k: m[k] for k in ("role", "content")} for m in conversation]


def test_clean_messages_turns_a_bare_string_into_one_user_turn():
    assert clean_messages("Why?") == [{"role": "user", "content": "Why?"}]


@pytest.mark.parametrize(
    ("messages", "where"),
    [
        (None, "messages: must be a non-empty list"),
        ([], "messages: must be a non-empty list"),
        ({"role": "user"}, "messages: must be a non-empty list"),
        (["hi"], "messages[0]: must be an object"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 3}], "messages[0].content: must be a string"),
        (
            [{"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + 1)}],
            "messages[0].content: longer",
        ),
        (
            [{"role": "user", "content": "ok"}, {"role": "user", "content": "a\x00b"}],
            "messages[1].content: contains a NUL",
        ),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "last"),
    ],
)
def test_clean_messages_names_the_bad_part(messages, where):
    with pytest.raises(AnnotationError) as error:
        clean_messages(messages)
    assert where in error.value.message


# -- prompts, completions, critiques, sources ---------------------------------------------------


def test_prompt_create_stores_the_cleaned_conversation():
    campaign = make_campaign(comparisons=0)

    prompt = prompt_create(campaign=campaign, messages="Hi?", external_id="p1", split="eval")

    stored = Prompt.objects.get(pk=prompt.pk)
    assert stored.messages == [{"role": "user", "content": "Hi?"}]
    assert (stored.external_id, stored.split, stored.metadata) == ("p1", "eval", {})


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"split": "test"}, "split"),
        ({"external_id": "x" * 201}, "external_id"),
        ({"external_id": 7}, "external_id"),
        ({"metadata": ["a"]}, "metadata"),
        ({"messages": []}, "messages"),
    ],
)
def test_prompt_create_refuses_bad_fields_naming_them(kwargs, where):
    campaign = make_campaign(comparisons=0)
    kwargs = {"messages": "Hi?", **kwargs}

    with pytest.raises(AnnotationError) as error:
        prompt_create(campaign=campaign, **kwargs)

    assert error.value.message.startswith(where)
    assert not Prompt.objects.filter(campaign=campaign).exists()


def test_prompt_external_id_is_unique_per_campaign_only():
    campaign, other = make_campaign(comparisons=0), make_campaign(comparisons=0)
    prompt_create(campaign=campaign, messages="a", external_id="same")

    with pytest.raises(AnnotationError, match="external_id"):
        prompt_create(campaign=campaign, messages="b", external_id="same")
    prompt_create(campaign=other, messages="b", external_id="same")
    prompt_create(campaign=campaign, messages="c")
    prompt_create(campaign=campaign, messages="d")  # empty ids never collide

    assert Prompt.objects.filter(campaign=campaign).count() == 3


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"text": None}, "text: must be a string"),
        ({"text": "x" * (MAX_MESSAGE_CHARS + 1)}, "text: longer"),
        ({"text": "nul\x00"}, "text: contains a NUL"),
        ({"external_id": "x" * 201}, "external_id"),
        ({"generation": "temp=1"}, "generation"),
    ],
)
def test_completion_create_refuses_bad_fields_naming_them(kwargs, where):
    prompt = PromptFactory()
    kwargs = {"text": "fine", **kwargs}

    with pytest.raises(AnnotationError) as error:
        completion_create(prompt=prompt, source=source_get_or_create(name="m"), **kwargs)

    assert error.value.message.startswith(where)
    assert not Completion.objects.exists()


def test_completion_create_keeps_source_and_generation_settings():
    prompt = PromptFactory()
    source = source_get_or_create(name="policy-v3", kind=SourceKind.POLICY)

    completion = completion_create(
        prompt=prompt, text="Four.", source=source, generation={"temperature": 0.7}, round_number=3
    )

    stored = Completion.objects.get(pk=completion.pk)
    assert (stored.source.name, stored.source.kind) == ("policy-v3", SourceKind.POLICY)
    assert (stored.generation, stored.round_number) == ({"temperature": 0.7}, 3)


def test_source_get_or_create_returns_one_row_per_name():
    first = source_get_or_create(name="  gpt-x ")
    again = source_get_or_create(name="gpt-x")

    assert first.pk == again.pk
    assert first.name == "gpt-x"
    assert source_get_or_create(name="y" * 300).name == "y" * 200
    with pytest.raises(AnnotationError):
        source_get_or_create(name="   ")
    with pytest.raises(AnnotationError):
        source_get_or_create(name="z", kind="alien")
    assert Source.objects.count() == 2


def test_critique_create_accepts_spans_inside_the_completion():
    completion = CompletionFactory(text="The moon is cheese.")

    critique = critique_create(
        completion=completion, critic="critic", text="False.", spans=[{"start": 12, "end": 18}]
    )

    assert critique.spans == [{"start": 12, "end": 18}]


@pytest.mark.parametrize(
    ("spans", "where"),
    [
        ("0-3", "spans: must be a list"),
        ([[0, 3]], "spans[0]: must be an object"),
        ([{"start": 3, "end": 3}], "spans[0]"),
        ([{"start": -1, "end": 3}], "spans[0]"),
        ([{"start": True, "end": 3}], "spans[0]"),
        ([{"start": 0, "end": 2}, {"start": 0, "end": 99}], "spans[1]: end is past"),
    ],
)
def test_critique_create_refuses_bad_spans_naming_them(spans, where):
    completion = CompletionFactory(text="short text")

    with pytest.raises(AnnotationError) as error:
        critique_create(completion=completion, critic="c", text="t", spans=spans)

    assert error.value.message.startswith(where)


# -- comparisons --------------------------------------------------------------------------------


def _prompt_with(campaign, n: int):
    prompt = PromptFactory(campaign=campaign)
    return prompt, [CompletionFactory(prompt=prompt) for _ in range(n)]


def test_comparisons_are_stored_in_canonical_order_with_overlap_slots():
    campaign = make_campaign(comparisons=0, overlap=3)
    prompt, (x, y) = _prompt_with(campaign, 2)

    made = comparisons_create(
        campaign=campaign,
        pairs=[PairSpec(prompt_id=prompt.pk, completion_x=y.pk, completion_y=x.pk, priority=2.5)],
    )

    comparison = Comparison.objects.get(campaign=campaign)
    assert made == 1
    assert (comparison.completion_a_id, comparison.completion_b_id) == (x.pk, y.pk)
    assert comparison.judgments_wanted == 3
    slots = Slot.objects.filter(comparison=comparison).order_by("index")
    assert [(s.index, s.status, s.priority) for s in slots] == [
        (0, "open", 2.5),
        (1, "open", 2.5),
        (2, "open", 2.5),
    ]


@pytest.mark.parametrize(
    ("written", "stored"), [("a", "b"), ("b", "a"), ("tie", "tie"), ("both_bad", "both_bad")]
)
def test_gold_answer_follows_the_pair_into_canonical_order(written, stored):
    campaign = make_campaign(comparisons=0)
    prompt, (x, y) = _prompt_with(campaign, 2)

    comparisons_create(
        campaign=campaign,
        pairs=[
            PairSpec(prompt_id=prompt.pk, completion_x=y.pk, completion_y=x.pk, gold_choice=written)
        ],
    )

    assert Comparison.objects.get(campaign=campaign).gold_choice == stored


def test_a_pair_given_twice_or_reversed_or_again_later_is_one_comparison():
    campaign = make_campaign(comparisons=0, overlap=2)
    prompt, (x, y, z) = _prompt_with(campaign, 3)
    xy = PairSpec(prompt_id=prompt.pk, completion_x=x.pk, completion_y=y.pk)
    yx = PairSpec(prompt_id=prompt.pk, completion_x=y.pk, completion_y=x.pk)
    xz = PairSpec(prompt_id=prompt.pk, completion_x=x.pk, completion_y=z.pk)

    assert comparisons_create(campaign=campaign, pairs=[xy, yx, xy]) == 1
    assert comparisons_create(campaign=campaign, pairs=[yx, xz], batch_size=1) == 1

    assert Comparison.objects.filter(campaign=campaign).count() == 2
    assert Slot.objects.filter(campaign=campaign).count() == 4


def test_the_same_pair_may_exist_in_two_campaigns_database_refuses_forged_duplicates():
    campaign = make_campaign(comparisons=1)
    comparison = Comparison.objects.get(campaign=campaign)
    a, b = comparison.completion_a_id, comparison.completion_b_id

    with pytest.raises(IntegrityError), transaction.atomic():
        Comparison.objects.create(
            campaign=campaign,
            prompt=comparison.prompt,
            completion_a_id=a,
            completion_b_id=b,
            judgments_wanted=1,
        )
    with pytest.raises(IntegrityError), transaction.atomic():
        Comparison.objects.create(
            campaign=campaign,
            prompt=comparison.prompt,
            completion_a_id=b,
            completion_b_id=a,
            judgments_wanted=1,
        )


def test_pairs_must_answer_their_prompt_in_this_campaign():
    campaign, other = make_campaign(comparisons=0), make_campaign(comparisons=0)
    prompt, (x, y) = _prompt_with(campaign, 2)
    _, (z,) = _prompt_with(campaign, 1)
    foreign_prompt, (f1, f2) = _prompt_with(other, 2)
    ok = PairSpec(prompt_id=prompt.pk, completion_x=x.pk, completion_y=y.pk)
    cases = {
        "another prompt's completion": PairSpec(
            prompt_id=prompt.pk, completion_x=x.pk, completion_y=z.pk
        ),
        "another campaign's pair": PairSpec(
            prompt_id=foreign_prompt.pk, completion_x=f1.pk, completion_y=f2.pk
        ),
        "a missing completion": PairSpec(prompt_id=prompt.pk, completion_x=x.pk, completion_y=0),
    }
    for case, bad in cases.items():
        with pytest.raises(AnnotationError, match=r"^pairs\[1\]: completion") as error:
            comparisons_create(campaign=campaign, pairs=[ok, bad])
        assert error.value.message, case
    assert not Comparison.objects.filter(campaign=campaign).exists()


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"completion_y": "x"}, r"pairs\[0\]: a comparison needs two different"),
        ({"gold_choice": "left"}, r"pairs\[0\]\.gold_choice"),
        ({"priority": float("nan")}, r"pairs\[0\]\.priority"),
        ({"priority": float("inf")}, r"pairs\[0\]\.priority"),
    ],
)
def test_comparisons_create_refuses_bad_pairs_naming_them(change, where):
    campaign = make_campaign(comparisons=0)
    prompt, (x, y) = _prompt_with(campaign, 2)
    fields = {"prompt_id": prompt.pk, "completion_x": x.pk, "completion_y": y.pk}
    fields.update(change)
    if fields["completion_y"] == "x":
        fields["completion_y"] = x.pk

    with pytest.raises(AnnotationError, match=where):
        comparisons_create(campaign=campaign, pairs=[PairSpec(**fields)])


def test_comparisons_create_is_all_or_nothing_across_batches():
    campaign = make_campaign(comparisons=0)
    prompt, completions = _prompt_with(campaign, 4)
    ids = [c.pk for c in completions]
    good = [PairSpec(prompt_id=prompt.pk, completion_x=ids[0], completion_y=i) for i in ids[1:]]
    bad = PairSpec(prompt_id=prompt.pk, completion_x=ids[1], completion_y=ids[1])

    with pytest.raises(AnnotationError, match=r"pairs\[3\]"):
        comparisons_create(campaign=campaign, pairs=[*good, bad], batch_size=2)

    assert not Comparison.objects.exists()
    assert not Slot.objects.exists()


def test_build_all_pairs_makes_every_unordered_pair_once():
    campaign = make_campaign(comparisons=0, overlap=2)
    _prompt_with(campaign, 4)
    _prompt_with(campaign, 1)  # a lone answer makes no pair

    assert comparisons_build(campaign=campaign, strategy=PairingStrategy.ALL_PAIRS) == 6
    assert comparisons_build(campaign=campaign) == 0

    assert Slot.objects.filter(campaign=campaign).count() == 12


def test_build_random_k_makes_k_distinct_pairs_per_prompt_reproducibly():
    def build(seed: int) -> set[tuple[int, int]]:
        campaign = make_campaign(comparisons=0)
        for _ in range(3):
            _prompt_with(campaign, 5)
        made = comparisons_build(
            campaign=campaign, strategy=PairingStrategy.RANDOM_K, k=3, seed=seed
        )
        assert made == 9
        rows = Comparison.objects.filter(campaign=campaign).order_by("id")
        base = min(
            Completion.objects.filter(prompt__campaign=campaign).values_list("id", flat=True)
        )
        per_prompt = {}
        for comparison in rows:
            per_prompt.setdefault(comparison.prompt_id, set()).add(comparison.pk)
        assert all(len(v) == 3 for v in per_prompt.values())
        return {(c.completion_a_id - base, c.completion_b_id - base) for c in rows}

    assert build(seed=7) == build(seed=7)


def test_build_only_for_the_given_prompts():
    campaign = make_campaign(comparisons=0)
    first, _ = _prompt_with(campaign, 3)
    _prompt_with(campaign, 3)

    assert comparisons_build(campaign=campaign, prompt_ids=[first.pk]) == 3
    assert set(Comparison.objects.values_list("prompt_id", flat=True)) == {first.pk}


@pytest.mark.parametrize(("kwargs", "match"), [({"strategy": "best"}, "strategy"), ({"k": 0}, "k")])
def test_build_refuses_bad_options(kwargs, match):
    with pytest.raises(AnnotationError, match=match):
        comparisons_build(campaign=make_campaign(comparisons=0), **kwargs)


def test_choose_pairs_random_k_never_repeats_and_caps_at_all_pairs():
    rng = random.Random(1)

    picked = choose_pairs([1, 2, 3, 4, 5, 6], strategy=PairingStrategy.RANDOM_K, k=20, rng=rng)
    few = choose_pairs([1, 2, 3, 4, 5, 6], strategy=PairingStrategy.RANDOM_K, k=4, rng=rng)

    assert len(picked) == len(set(picked)) == 15
    assert len(few) == len(set(few)) == 4
    assert all(a < b for a, b in few)


# -- statistics after a big import ----------------------------------------------------------------


def _pairs_of_one_prompt(campaign, completions: int) -> list[PairSpec]:
    prompt = PromptFactory(campaign=campaign)
    ids = [CompletionFactory(prompt=prompt).pk for _ in range(completions)]
    return [
        PairSpec(prompt_id=prompt.pk, completion_x=x, completion_y=y)
        for i, x in enumerate(ids)
        for y in ids[i + 1 :]
    ]


@pytest.mark.postgres
def test_a_big_import_analyses_the_slot_table_once_it_is_committed(
    django_capture_on_commit_callbacks,
):
    """Without fresh statistics the planner leaves the open-slot index after a big import and
    every lease takes seconds until autovacuum comes by."""
    campaign = make_campaign(comparisons=0, overlap=50)
    pairs = _pairs_of_one_prompt(campaign, completions=21)  # 210 pairs x 50 = 10,500 slots

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        comparisons_create(campaign=campaign, pairs=pairs)

    assert Slot.objects.filter(campaign=campaign).count() == 10_500
    assert [c.__name__ for c in callbacks] == ["_analyze_slots"]  # and it ran without error


def test_a_small_import_leaves_statistics_to_autovacuum(django_capture_on_commit_callbacks):
    campaign = make_campaign(comparisons=0, overlap=2)
    pairs = _pairs_of_one_prompt(campaign, completions=5)

    with django_capture_on_commit_callbacks() as callbacks:
        comparisons_create(campaign=campaign, pairs=pairs)

    assert Slot.objects.filter(campaign=campaign).count() == 20
    assert callbacks == []
