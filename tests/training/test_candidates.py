"""Candidate generation: the policy's completions, resume safety, and each pairing strategy."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from annotation.models import Comparison, Completion, Slot, Source, SourceKind
from annotation.services.items import PairSpec, comparisons_create
from tests.factories import CompletionFactory, SourceFactory
from tests.training.helpers import tiny_base_model
from tests.training.loop_helpers import Recorder, make_run, prompt_campaign
from training.services.candidates import (
    GenerateConfigError,
    generate_execute,
    generate_settings,
    most_uncertain,
    pair_disagreement,
    pairs_new_vs_previous,
    pairs_within,
    pick_prompts,
)
from training.services.progress import RunCancelled

LN3 = math.log(3)  # sigmoid(ln 3) = 3/4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base_model(tmp_path_factory.mktemp("policy"))


def config(model: Path, **overrides: object) -> dict[str, object]:
    values: dict[str, object] = {
        "model": str(model),
        "device": "cpu",
        "seed": 0,
        "source_name": "policy-r1",
        "round_number": 1,
        "num_samples": 2,
        "max_new_tokens": 6,
        "temperature": 1.0,
        "top_p": 1.0,
        "batch_size": 2,
        "strategy": "none",
        "pairs_per_prompt": 2,
    }
    values.update(overrides)
    return values


def pairs_of(campaign) -> list[tuple[str, str]]:
    """The source names of each comparison's two sides, sorted within the pair."""
    rows = Comparison.objects.filter(campaign=campaign).values_list(
        "completion_a__source__name", "completion_b__source__name"
    )
    return sorted(tuple(sorted(r)) for r in rows)


# -- pure pieces, by hand --------------------------------------------------------------------


def test_pair_disagreement_is_the_spread_of_the_heads_probabilities() -> None:
    # Heads say P(x better) = sigmoid(ln 3) = 0.75 and sigmoid(0) = 0.5: mean 0.625, each
    # 0.125 away from it, so the population std is 0.125.
    assert pair_disagreement([LN3, 0.0], [0.0, 0.0]) == pytest.approx(0.125)
    # Heads that agree (both 0.75, whatever the raw values) do not disagree.
    assert pair_disagreement([LN3 + 2.0, 1.0], [2.0, 1.0 - LN3]) == pytest.approx(0.0, abs=1e-12)
    # Three heads at 0.25, 0.5, 0.75: std = sqrt((1/16 + 0 + 1/16) / 3) = sqrt(1/24).
    assert pair_disagreement([-LN3, 0.0, LN3], [0.0, 0.0, 0.0]) == pytest.approx(math.sqrt(1 / 24))


def test_one_head_falls_back_to_closeness_to_a_coin_flip() -> None:
    assert pair_disagreement([0.0], [0.0]) == pytest.approx(0.5)  # P = 0.5: most unsure
    assert pair_disagreement([LN3], [0.0]) == pytest.approx(0.25)  # P = 0.75
    assert pair_disagreement([0.0], [LN3]) == pytest.approx(0.25)  # P = 0.25
    assert pair_disagreement([800.0], [0.0]) == pytest.approx(0.0)  # no overflow
    with pytest.raises(ValueError, match="same"):
        pair_disagreement([0.0, 1.0], [0.0])


def test_most_uncertain_keeps_the_top_pairs_highest_first() -> None:
    heads = {1: [LN3, 0.0], 2: [0.0, 0.0], 3: [0.0, LN3], 4: [0.0, 0.0]}
    # (1,2): 0.75 vs 0.5 -> 0.125; (1,3): 0.75 vs 0.25 -> 0.25; (2,4): 0.5 vs 0.5 -> 0.
    ranked = most_uncertain([(1, 2), (2, 4), (1, 3)], heads, 2)
    assert [(x, y) for x, y, _ in ranked] == [(1, 3), (1, 2)]
    assert [d for _, _, d in ranked] == pytest.approx([0.25, 0.125])


def test_pair_choices() -> None:
    assert pairs_new_vs_previous([10, 11, 12], [1, 2], 4) == [(10, 1), (11, 2), (12, 1), (10, 2)]
    assert pairs_new_vs_previous([10, 11], [1], 5) == [(10, 1), (11, 1)]
    assert pairs_new_vs_previous([10], [], 2) == []
    assert pairs_within([1, 2, 3, 4, 5], 3) == [(1, 2), (3, 4), (1, 3)]
    assert pairs_within([1], 2) == []


def test_pick_prompts_takes_the_least_covered_and_keeps_started_ones() -> None:
    ranked = [5, 3, 9, 1]  # least covered first
    assert pick_prompts(ranked, set(), 2) == [3, 5]
    assert pick_prompts(ranked, {9}, 2) == [5, 9]  # a resumed round keeps prompt 9
    assert pick_prompts(ranked, set(), 0) == [1, 3, 5, 9]


def test_settings_name_every_problem() -> None:
    with pytest.raises(GenerateConfigError) as err:
        generate_settings(
            {"model": "m", "source_name": "s", "strategy": "two_samples", "num_samples": 1}
        )
    assert "num_samples" in str(err.value)
    with pytest.raises(GenerateConfigError) as err:
        generate_settings({"source_name": "s", "strategy": "uncertainty", "batch_size": 0})
    message = str(err.value)
    assert "model: required" in message
    assert "reward_model" in message
    assert "batch_size" in message
    with pytest.raises(GenerateConfigError, match="strategy"):
        generate_settings({"model": "m", "source_name": "s", "strategy": "best"})


# -- the run -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_generates_policy_completions_for_the_split_and_a_rerun_adds_nothing(
    tiny_model: Path,
) -> None:
    campaign, prompts = prompt_campaign(train=3, eval=1)
    run = make_run(campaign, "generate", **config(tiny_model))
    report = Recorder()

    metrics = generate_execute(run=run, report=report)

    made = Completion.objects.filter(source__name="policy-r1")
    assert made.count() == 6
    assert Source.objects.get(name="policy-r1").kind == SourceKind.POLICY
    assert set(made.values_list("round_number", flat=True)) == {1}
    assert sorted(made.values_list("prompt_id", flat=True)) == sorted([p.pk for p in prompts] * 2)
    note = made.first().generation
    assert note["run"] == run.pk
    assert note["max_new_tokens"] == 6
    assert 0 < note["tokens"] <= 6
    assert [(done, total) for done, total, _ in report.calls] == [(2, 3), (3, 3)]
    assert set(report.calls[0][2]) == {"mean_length", "eos_fraction"}
    assert metrics["completions"] == 6
    assert metrics["comparisons"] == 0
    assert metrics["prompts"] == 3
    assert 0 < metrics["mean_length"] <= 6
    assert 0 <= metrics["eos_fraction"] <= 1

    again = Recorder()
    metrics = generate_execute(run=run, report=again)
    assert made.count() == 6
    assert metrics["completions"] == 0
    assert again.calls == []


@pytest.mark.django_db
def test_cancel_keeps_the_finished_batch_and_a_resume_completes_the_round(
    tiny_model: Path,
) -> None:
    campaign, prompts = prompt_campaign(train=3)
    run = make_run(campaign, "generate", **config(tiny_model, strategy="two_samples"))

    with pytest.raises(RunCancelled):
        generate_execute(run=run, report=Recorder(cancel_after=1))

    # The first batch (2 prompts x 2 samples) was committed before the cancel; nothing else.
    per_prompt = {p.pk: Completion.objects.filter(prompt=p).count() for p in prompts}
    assert per_prompt == {prompts[0].pk: 2, prompts[1].pk: 2, prompts[2].pk: 0}
    assert not Comparison.objects.filter(campaign=campaign).exists()

    report = Recorder()
    metrics = generate_execute(run=run, report=report)
    assert [(done, total) for done, total, _ in report.calls] == [(1, 1)]
    assert metrics["completions"] == 2
    assert Completion.objects.filter(prompt__campaign=campaign).count() == 6
    assert metrics["comparisons"] == 3  # one pair per prompt: each has two samples
    # Comparisons are built again on a rerun without duplicates.
    assert generate_execute(run=run, report=Recorder())["comparisons"] == 0
    assert Comparison.objects.filter(campaign=campaign).count() == 3


@pytest.mark.django_db
def test_a_batch_written_meanwhile_by_a_duplicate_delivery_is_not_written_twice(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.core.generation import TransformersGenerator

    campaign, prompts = prompt_campaign(train=2)
    run = make_run(campaign, "generate", **config(tiny_model))
    source = SourceFactory(name="policy-r1", kind=SourceKind.POLICY)
    original = TransformersGenerator.generate

    def generate_while_another_worker_writes(self, *args, **kwargs):
        # Another delivery of the same run commits this batch while this one samples it:
        # all samples of the first prompt, one of the second.
        for prompt, n in ((prompts[0], 2), (prompts[1], 1)):
            for _ in range(n):
                CompletionFactory(prompt=prompt, source=source, round_number=1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TransformersGenerator, "generate", generate_while_another_worker_writes)
    metrics = generate_execute(run=run, report=Recorder())

    assert metrics["completions"] == 1  # only the second prompt's missing sample
    for prompt in prompts:
        assert Completion.objects.filter(prompt=prompt, source=source).count() == 2


@pytest.mark.django_db
@pytest.mark.parametrize("strategy", ["two_samples", "new_vs_previous"])
def test_answers_with_the_same_text_are_never_compared(tiny_model: Path, strategy: str) -> None:
    """Greedy decoding writes the same answer every time (and the 'previous' policy is the
    same model): nothing would be left for a rater to decide, so no comparison is built."""
    campaign, _ = prompt_campaign(train=2)
    run = make_run(
        campaign,
        "generate",
        **config(
            tiny_model,
            strategy=strategy,
            num_samples=2,
            temperature=0.0,
            previous_source="base",
            previous_model=str(tiny_model),
        ),
    )
    metrics = generate_execute(run=run, report=Recorder())
    # Two new answers per prompt, and for new_vs_previous one of the previous policy's.
    assert metrics["completions"] == (4 if strategy == "two_samples" else 6)
    for prompt in campaign.prompts.all():
        assert len({c.text for c in prompt.completions.all()}) == 1
    assert metrics["comparisons"] == 0
    assert not Comparison.objects.filter(campaign=campaign).exists()


@pytest.mark.django_db
def test_two_samples_pairs_new_samples_of_the_same_prompt(tiny_model: Path) -> None:
    campaign, prompts = prompt_campaign(train=2)
    other = SourceFactory(name="imported")
    for prompt in prompts:
        CompletionFactory(prompt=prompt, source=other)
    run = make_run(
        campaign,
        "generate",
        **config(
            tiny_model,
            strategy="two_samples",
            num_samples=3,
            pairs_per_prompt=2,
            # Named (a round always names it) but not needed: it writes nothing.
            previous_source="base",
            previous_model=str(tiny_model),
        ),
    )

    metrics = generate_execute(run=run, report=Recorder())

    assert metrics["comparisons"] == 4
    assert metrics["completions"] == 6
    assert not Completion.objects.filter(source__name="base").exists()
    assert pairs_of(campaign) == [("policy-r1", "policy-r1")] * 4
    for comparison in Comparison.objects.filter(campaign=campaign):
        assert comparison.completion_a.prompt_id == comparison.prompt_id
        assert comparison.completion_b.prompt_id == comparison.prompt_id
        assert comparison.priority == 0
    # Each comparison got its slots (overlap 1).
    assert Slot.objects.filter(campaign=campaign).count() == 4


@pytest.mark.django_db
def test_new_vs_previous_pairs_each_new_sample_with_the_previous_policy(tiny_model: Path) -> None:
    campaign, prompts = prompt_campaign(train=3)
    base = SourceFactory(name="base")
    # The previous policy already answered the first prompt in round 0; it answers the others
    # here (one sample each), and the first is not answered twice.
    earlier = CompletionFactory(prompt=prompts[0], source=base, round_number=0)
    run = make_run(
        campaign,
        "generate",
        **config(
            tiny_model,
            strategy="new_vs_previous",
            previous_source="base",
            previous_model=str(tiny_model),
        ),
    )
    report = Recorder()

    metrics = generate_execute(run=run, report=report)

    # 3 prompts for the new policy, then 2 for the previous one, in batches of 2.
    assert [(done, total) for done, total, _ in report.calls] == [(2, 5), (3, 5), (5, 5)]
    previous = Completion.objects.filter(source=base)
    assert previous.count() == 3
    assert previous.filter(prompt=prompts[0]).get() == earlier
    assert set(previous.exclude(pk=earlier.pk).values_list("round_number", flat=True)) == {1}
    assert metrics["completions"] == 8  # 6 new + 2 previous
    assert metrics["comparisons"] == 6  # 2 new samples x 1 previous answer per prompt
    assert pairs_of(campaign) == [("base", "policy-r1")] * 6


@pytest.mark.django_db
def test_new_vs_previous_without_a_previous_source_pairs_new_samples(tiny_model: Path) -> None:
    campaign, _ = prompt_campaign(train=1)
    run = make_run(campaign, "generate", **config(tiny_model, strategy="new_vs_previous"))
    assert generate_execute(run=run, report=Recorder())["comparisons"] == 1
    assert pairs_of(campaign) == [("policy-r1", "policy-r1")]


@pytest.mark.django_db
def test_prompts_per_round_answers_the_least_covered_prompts(tiny_model: Path) -> None:
    campaign, prompts = prompt_campaign(train=4)
    # Prompts 0 and 2 already have a comparison; 1 and 3 have none.
    for prompt in (prompts[0], prompts[2]):
        x, y = CompletionFactory(prompt=prompt), CompletionFactory(prompt=prompt)
        comparisons_create(
            campaign=campaign,
            pairs=[PairSpec(prompt_id=prompt.pk, completion_x=x.pk, completion_y=y.pk)],
        )
    run = make_run(campaign, "generate", **config(tiny_model, prompts_per_round=2, num_samples=1))
    metrics = generate_execute(run=run, report=Recorder())
    assert metrics["prompts"] == 2
    answered = set(
        Completion.objects.filter(source__name="policy-r1").values_list("prompt_id", flat=True)
    )
    assert answered == {prompts[1].pk, prompts[3].pk}


# -- uncertainty -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A two-head reward model trained for two steps: enough for its heads to differ."""
    from training.core.data import PreferencePair
    from training.core.modeling import load_reward_model, load_tokenizer, set_seed
    from training.core.reward import RewardConfig, train_reward_model

    out = tmp_path_factory.mktemp("rm") / "model"
    pairs = [
        PreferencePair([{"role": "user", "content": f"Question {i}?"}], "The sea is blue.", "No.")
        for i in range(8)
    ]
    cfg = RewardConfig(
        model=str(tiny_model),
        output_dir=str(out),
        device="cpu",
        max_steps=2,
        batch_size=4,
        ensemble_size=2,
        learning_rate=1e-3,
        max_length=48,
        max_prompt_length=24,
        seed=0,
    )
    set_seed(0)
    model = load_reward_model(tiny_model, device="cpu", num_labels=2)
    train_reward_model(cfg, pairs, model, load_tokenizer(tiny_model))
    return out


def expected_top_pairs(reward_model: Path, completions: list[Completion], k: int):
    """The top-k pairs of one prompt's completions, worked out with torch from the reward
    model's head outputs: std over heads of sigmoid(r_x - r_y)."""
    from training.core.modeling import load_reward_model, load_tokenizer
    from training.core.reward import score_completions

    model = load_reward_model(reward_model, device="cpu")
    heads = score_completions(
        model,
        load_tokenizer(reward_model),
        [c.prompt.messages for c in completions],
        [c.text for c in completions],
        max_length=48,
        max_prompt_length=24,
    )  # (N, 2)
    assert heads.shape == (len(completions), 2)
    scored = []
    for i in range(len(completions)):
        for j in range(i + 1, len(completions)):
            p = torch.sigmoid(heads[i] - heads[j])  # (2,)
            scored.append((float(p.std(unbiased=False)), completions[i].pk, completions[j].pk))
    scored.sort(key=lambda row: -row[0])
    return scored[:k]


@pytest.mark.django_db
def test_uncertainty_keeps_the_pairs_the_heads_disagree_on_and_serves_them_first(
    tiny_model: Path, reward_model: Path
) -> None:
    campaign, prompts = prompt_campaign(train=2)
    base = SourceFactory(name="base")
    for prompt in prompts:
        CompletionFactory(prompt=prompt, source=base, round_number=0)
    run = make_run(
        campaign,
        "generate",
        **config(
            tiny_model,
            strategy="uncertainty",
            num_samples=3,
            pairs_per_prompt=2,
            previous_source="base",
            reward_model=str(reward_model),
        ),
    )

    metrics = generate_execute(run=run, report=Recorder())

    assert metrics["comparisons"] == 4
    for prompt in prompts:
        candidates = list(Completion.objects.filter(prompt=prompt).order_by("id"))
        assert len(candidates) == 4  # 3 new + 1 previous: 6 candidate pairs
        expected = expected_top_pairs(reward_model, candidates, 2)
        made = Comparison.objects.filter(prompt=prompt).order_by("-priority")
        assert [(c.completion_a_id, c.completion_b_id) for c in made] == [
            (x, y) for _, x, y in expected
        ]
        assert [c.priority for c in made] == pytest.approx([d for d, _, _ in expected], abs=1e-5)
        assert all(c.priority > 0 for c in made)
        # Slots carry the priority too: the queue serves these first.
        for comparison in made:
            assert set(
                Slot.objects.filter(comparison=comparison).values_list("priority", flat=True)
            ) == {comparison.priority}
