"""Reward sources: functions, reward models and weighted sums behind one interface."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from training.core.modeling import load_reward_model, load_tokenizer
from training.core.reward import score_completions
from training.core.rewards import (
    FunctionSource,
    RewardModelSource,
    WeightedSumSource,
    build_reward_source,
    load_function,
    score_tensor,
)

PROMPTS = [[{"role": "user", "content": "Say something."}], [{"role": "user", "content": "Hi?"}]]


def has_cat(prompts: list[Any], completions: list[str]) -> list[float]:
    return [1.0 if "cat" in c else 0.0 for c in completions]


def matches_answer(
    prompts: list[Any], completions: list[str], answer: list[str]
) -> list[float | None]:
    return [
        None if a is None else float(c.strip() == a)
        for c, a in zip(completions, answer, strict=True)
    ]


def takes_everything(prompts: list[Any], completions: list[str], **kwargs: Any) -> list[float]:
    return [float(len(kwargs))] * len(completions)


def test_function_source_passes_only_the_columns_it_accepts():
    columns = {"answer": ["4", None], "source": ["a", "b"]}
    assert FunctionSource(matches_answer)(PROMPTS, [" 4", "5"], columns) == [1.0, None]
    assert FunctionSource(has_cat)(PROMPTS, ["a cat", "a dog"], columns) == [1.0, 0.0]
    assert FunctionSource(takes_everything)(PROMPTS, ["x", "y"], columns) == [2.0, 2.0]


def test_function_source_rejects_a_wrong_number_of_rewards():
    source = FunctionSource(lambda prompts, completions: [1.0], name="short")
    with pytest.raises(ValueError, match="short returned 1 values for 2"):
        source(PROMPTS, ["a", "b"])


def test_weighted_sum_skips_none_and_keeps_all_none_unscorable():
    a = FunctionSource(lambda prompts, completions: [1.0, None, None], name="a")
    b = FunctionSource(lambda prompts, completions: [2.0, 4.0, None], name="b")
    total = WeightedSumSource([a, b], [1.0, -0.5])
    assert total([PROMPTS[0]] * 3, ["x", "y", "z"]) == [0.0, -2.0, None]
    assert total.last_components == {"a": [1.0, None, None], "b": [2.0, 4.0, None]}
    scores = score_tensor(total, [PROMPTS[0]] * 3, ["x", "y", "z"])
    assert scores[:2].tolist() == [0.0, -2.0]
    assert math.isnan(scores[2])


def test_build_reward_source_parses_weights_functions_and_models(tiny_model_dir):
    one = build_reward_source("tests.training.core.test_rewards:has_cat")
    assert isinstance(one, FunctionSource)
    assert one(PROMPTS, ["cat", "dog"]) == [1.0, 0.0]
    mixed = build_reward_source(
        f"{tiny_model_dir}, 2*tests.training.core.test_rewards:has_cat", max_length=64
    )
    assert isinstance(mixed, WeightedSumSource)
    assert mixed.weights == [1.0, 2.0]
    assert isinstance(mixed.sources[0], RewardModelSource)
    scored = mixed(PROMPTS, ["a cat", "a dog"])
    alone = mixed.sources[0](PROMPTS, ["a cat", "a dog"])
    assert scored[0] == pytest.approx(alone[0] + 2.0)  # type: ignore[operator]
    assert scored[1] == pytest.approx(alone[1])
    named = build_reward_source("0.5*mine", functions={"mine": has_cat})
    assert isinstance(named, WeightedSumSource)
    assert named(PROMPTS, ["cat", "x"]) == [0.5, 0.0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [("", "no reward source"), ("x*tests.training.core.test_rewards:has_cat", "bad reward weight")],
)
def test_build_reward_source_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        build_reward_source(spec)


def test_load_function_errors():
    with pytest.raises(ValueError, match="module:function"):
        load_function("no_colon_here")
    with pytest.raises(AttributeError):
        load_function("tests.training.core.test_rewards:missing")


@pytest.fixture
def reward_model(tiny_model_dir: Path) -> tuple[Any, Any]:
    torch.manual_seed(0)
    return load_reward_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


def test_reward_model_source_scores_like_reward_training_and_applies_normalisation(reward_model):
    model, tokenizer = reward_model
    completions = ["the cat sat on the mat", "no"]
    raw = score_completions(
        model, tokenizer, PROMPTS, completions, max_length=64, max_prompt_length=32
    ).mean(-1)
    source = RewardModelSource(model, tokenizer, max_length=64, max_prompt_length=32)
    torch.testing.assert_close(torch.tensor(source(PROMPTS, completions)), raw)
    model.config.reward_gain, model.config.reward_bias = 2.0, 1.0
    torch.testing.assert_close(torch.tensor(source(PROMPTS, completions)), 2.0 * raw + 1.0)


def test_reward_model_score_does_not_depend_on_the_batch(reward_model):
    """Padding other rows to a longer one must not change a row's score."""
    model, tokenizer = reward_model
    source = RewardModelSource(model, tokenizer, max_length=64, max_prompt_length=32)
    long = "one two three four five six seven eight nine ten " * 2
    together = source([PROMPTS[0], PROMPTS[1]], ["short", long])
    alone = source([PROMPTS[0]], ["short"])
    assert together[0] == pytest.approx(alone[0], abs=1e-5)
