"""The loop benchmark's pieces (benchmarks/loop_sim.py, benchmarks/_loop_common.py).

The gold reward and the simulated raters are checked against hand-worked values and the
Bradley-Terry probabilities they claim; the uncertainty formula against the platform's own;
the label counting on made-up curves; then one tiny round of each loop and one tiny
label-efficiency seed run end to end through the real trainers (tiny models, a few steps).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from benchmarks._loop_common import (
    GOOD,
    WORDS,
    ModelSettings,
    RaterPool,
    RewardSettings,
    all_pairs,
    bt_probability,
    consecutive_pairs,
    disagreement,
    expected_inter_rater_agreement,
    gold_pairs,
    gold_reward,
    initial_policy,
    sft_demonstrations,
    word_weights,
)
from benchmarks.loop_sim import (
    ActiveSettings,
    LoopSettings,
    active_seed,
    labels_to_reach,
    loop_verdict,
    most_uncertain,
    run_loop,
    target_summary,
)

# ---- the task ------------------------------------------------------------------------------


def test_gold_reward_is_the_share_of_good_words() -> None:
    assert {"good", "sky", "blue", "light", "sea", "help"} == GOOD
    assert gold_reward("good sky cat dog") == 0.5
    assert gold_reward("blue help good sea sky") == 1.0
    assert gold_reward("the cat sat on a mat") == 0.0
    # Under four words an answer counts as four long: one good word is not a perfect answer.
    assert gold_reward("blue help") == 0.5
    assert gold_reward("good") == 0.25
    assert gold_reward("") == 0.0
    # Words, not substrings: "goodness" and "skyline" are not good words.
    assert gold_reward("goodness skyline sea light a") == pytest.approx(2 / 5)


def test_demonstrations_are_zipfian_with_a_quarter_good_words() -> None:
    weights = word_weights()
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] / weights[23] == pytest.approx(24.0)  # rank 1 vs rank 24, Zipf 1
    good_share = sum(w for word, w in zip(WORDS, weights, strict=True) if word in GOOD)
    demos = sft_demonstrations(4000, random.Random(0))
    words = [w for d in demos for w in d.completion.split()]
    assert all(4 <= len(d.completion.split()) <= 10 for d in demos)
    assert sum(w in GOOD for w in words) / len(words) == pytest.approx(good_share, abs=0.01)
    counts = Counter(words)
    assert counts["the"] > 10 * counts["help"] > 0  # common vs rare good word


def test_pairs_drop_identical_answers_and_ties_have_no_gold_label() -> None:
    items = [[{"role": "user", "content": "x"}], [{"role": "user", "content": "y"}]]
    texts = ["good cat", "cat cat", "good cat", "sky", "sea", "dog"]
    pairs = all_pairs(items, texts, 3)
    assert [(c.a, c.b) for c in pairs] == [
        ("good cat", "cat cat"),
        ("cat cat", "good cat"),
        ("sky", "sea"),
        ("sky", "dog"),
        ("sea", "dog"),
    ]
    # The gold-better answer goes first; "sky" vs "sea" is a tie (both 0.25): no gold answer.
    assert [(p.chosen, p.rejected) for p in gold_pairs(pairs)] == [
        ("good cat", "cat cat"),
        ("good cat", "cat cat"),
        ("sky", "dog"),
        ("sea", "dog"),
    ]
    # Consecutive pairs: samples (0, 1), (2, 3) of each prompt's four.
    four = ["sky", "cat", "dog", "dog"]
    assert [(c.a, c.b) for c in consecutive_pairs(items[:1], four, 4)] == [("sky", "cat")]


# ---- the raters ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("good sky cat dog", "good cat dog mat"),  # gold 0.5 vs 0.25
        ("good cat dog mat", "good sky cat dog"),  # the reverse
        ("good sky cat dog", "cat dog mat the"),  # 0.5 vs 0
        ("sky cat", "sea dog"),  # a tie: a coin flip
    ],
)
def test_raters_choose_with_bradley_terry_probabilities(a: str, b: str) -> None:
    beta, n = 6.0, 6000
    pool = RaterPool(5, beta, seed=11)
    first = sum(pool.label([{"role": "user", "content": "q"}], a, b).chosen == a for _ in range(n))
    p = 1 / (1 + math.exp(-beta * (gold_reward(a) - gold_reward(b))))
    assert bt_probability(gold_reward(a), gold_reward(b), beta) == pytest.approx(p)
    # Four standard errors of a binomial proportion: fails by chance about once in 16,000.
    assert first / n == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n) + 1e-9)


def test_every_rater_in_the_pool_answers_and_streams_are_seeded() -> None:
    item = [{"role": "user", "content": "q"}]
    pool = RaterPool(3, 6.0, seed=2)
    picks = Counter(pool.pick.choice(pool.raters).id for _ in range(300))
    assert set(picks) == {0, 1, 2}
    one, two = RaterPool(3, 6.0, seed=2), RaterPool(3, 6.0, seed=2)
    answers = [one.label(item, "good cat", "cat dog").chosen for _ in range(50)]
    assert answers == [two.label(item, "good cat", "cat dog").chosen for _ in range(50)]
    assert len(set(answers)) == 2  # p = sigmoid(6 * 0.25) = 0.82: both occur in 50 draws
    # Two raters with p = 0.5 agree half the time; with p = 1 always.
    assert expected_inter_rater_agreement([("sky", "sea")], 6.0) == pytest.approx(0.5)
    assert expected_inter_rater_agreement([("sky", "cat")], 1e4) == pytest.approx(1.0)


# ---- uncertainty and counting labels ------------------------------------------------------


def test_disagreement_is_the_platforms_formula() -> None:
    from training.services.candidates import pair_disagreement

    heads_x, heads_y = [0.3, -1.2, 2.0, 0.0], [1.0, 0.5, -0.5, 0.1]
    diffs = torch.tensor(heads_x) - torch.tensor(heads_y)
    assert float(disagreement(diffs)) == pytest.approx(pair_disagreement(heads_x, heads_y))
    assert float(disagreement(torch.zeros(4))) == 0.0  # heads that agree are not unsure


def test_most_uncertain_takes_each_prompts_most_uncertain_pair() -> None:
    # Prompt 0: answers whose heads agree; prompt 1: answer 2's heads split; prompt 2 too,
    # but less. Heads (P=3, n=3, K=2).
    heads = torch.tensor(
        [
            [[1.0, 1.0], [0.0, 0.0], [0.5, 0.5]],
            [[0.0, 0.0], [0.1, 0.1], [3.0, -3.0]],
            [[0.0, 0.0], [1.0, -1.0], [0.0, 0.0]],
        ]
    )
    options = {p: [(0, 1), (0, 2), (1, 2)] for p in range(3)}
    assert most_uncertain(heads, options, [0, 1, 2], 2) == [(1, 0, 2), (2, 0, 1)]
    # Labelled prompts are not offered again.
    assert most_uncertain(heads, options, [0, 2], 1) == [(2, 0, 1)]


def test_labels_to_reach_and_the_ratio_with_censored_arms() -> None:
    curve = [(64, 0.70), (96, 0.86), (128, 0.84), (160, 0.90)]
    assert labels_to_reach(curve, 0.85) == 96
    assert labels_to_reach(curve, 0.95) is None
    results = [
        {"seed": 0, "curves": {"random": curve, "uncertain": [(64, 0.86), (96, 0.9)]}},
        {"seed": 1, "curves": {"random": [(64, 0.5), (96, 0.6)], "uncertain": curve}},
    ]
    s = target_summary(results, 0.85, budget=160, batch=32)
    # Seed 0: 96 vs 64; seed 1: random never (counted as 192) vs 96.
    assert [(r["random"], r["uncertain"]) for r in s["per_seed"]] == [(96, 64), (None, 96)]
    assert s["per_seed"][0]["ratio"] == pytest.approx(1.5)
    assert s["per_seed"][1]["bound"] == "lower bound"
    assert s["random"] == pytest.approx((96 + 192) / 2)
    assert s["other_labels"] == pytest.approx(80)
    assert s["ratio"] == pytest.approx(144 / 80)
    assert s["bound"] == "lower bound"


def test_loop_verdict_reads_the_rows() -> None:
    rows = [
        {"gold": 0.25, "gold_se": 0.01, "kl_k1": 0.0, "kl_k3": 0.0},
        {"gold": 0.40, "gold_se": 0.01, "kl_k1": 2.1, "kl_k3": 2.0},
        {"gold": 0.38, "gold_se": 0.01, "kl_k1": 3.9, "kl_k3": 4.2},
    ]
    v = loop_verdict(rows, kl_bound=4.0)
    assert v["rounds_up"] == 1
    assert v["max_kl"] == pytest.approx(4.2)
    assert not v["kl_held"]
    assert v["rose"]
    assert loop_verdict(rows, kl_bound=5.0)["kl_held"]


# ---- end to end, tiny ------------------------------------------------------------------------


def test_one_tiny_round_of_each_loop_and_a_tiny_label_efficiency_seed(tmp_path: Path) -> None:
    settings = ModelSettings(
        hidden=32, layers=1, heads=2, sft_demos=128, sft_steps=20, max_new_tokens=8
    )
    reward = RewardSettings(ensemble=2, epochs=1, min_steps=3, warmup_steps=0)
    loop = LoopSettings(
        rounds=1,
        prompts_per_round=8,
        eval_prompts=6,
        eval_samples=2,
        policy_batch_size=4,
        ppo_steps=2,
    )
    policy_dir = initial_policy(tmp_path / "initial", settings, seed=0)
    results = {}
    for algorithm in ("dpo", "ppo"):
        result = run_loop(
            algorithm,
            policy_dir,
            tmp_path / algorithm,
            loop,
            reward,
            settings,
            raters=2,
            beta=10.0,
            seed=0,
        )
        results[algorithm] = result
        first, last = result.rows
        assert (first["round"], last["round"]) == (0, 1)
        assert 0 < last["labels"] <= loop.prompts_per_round
        # Before any training the policy is its own reference: KL 0 up to rounding.
        assert abs(first["kl_k1"]) < 1e-4
        assert first["kl_k3"] < 1e-4
        # After a round it has moved: a positive, finite KL.
        assert 0 < last["kl_k3"] < math.inf
        assert 0.0 <= last["gold"] <= 1.0
        assert (result.policies[0] / "config.json").is_file()
    assert results["dpo"].rows[0]["gold"] == results["ppo"].rows[0]["gold"]  # same samples

    active = ActiveSettings(
        seeds=1, pool_prompts=10, eval_prompts=6, seed_labels=4, batch=4, budget=8
    )
    res = active_seed(
        policy_dir,
        [policy_dir, results["dpo"].policies[0]],
        tmp_path / "active",
        active,
        reward,
        settings,
        raters=2,
        beta=10.0,
        seed=0,
    )
    for arm in ("random", "uncertain"):
        assert [n for n, _ in res["curves"][arm]] == [4, 8]
        assert all(0.0 <= acc <= 1.0 for _, acc in res["curves"][arm])
    # Both arms start from the same seed set, trained the same way: the same first point.
    assert res["curves"]["random"][0] == res["curves"]["uncertain"][0]
    assert res["eval_pairs"] > 0
    assert res["pool_pairs"] > active.budget
