"""The synthetic task, the simulated raters and thin wrappers around ``training.core`` for the
loop benchmark (``loop_sim.py``).

The task: a prompt asks for a line about an item; an answer is a sequence of words. The hidden
gold reward of an answer is the share of its words that come from a "good" set (``GOOD``, 6 of
the 24 words of ``WORDS``), counting an answer shorter than 4 words as 4 words long: a number
in [0, 1], 1 for an answer of at least 4 words that are all good. The initial policy is a random tiny Llama
fine-tuned (SFT) on answers of 4-10 words drawn with Zipf frequencies from ``WORDS``, so it
writes word sequences whose gold reward is about 0.25 and varies from answer to answer: pairs
of its answers differ in gold reward, which is what raters and the reward model need. Every
word is a single token of the tiny tokenizer, so each sampled token is a word choice.

Raters never see the gold reward; they answer like Bradley-Terry: A is preferred to B with
probability ``sigmoid(beta * (g(A) - g(B)))``, each rater with its own seeded random stream.

Everything that learns is the project's own code, called in process: ``train_sft``,
``train_reward_model`` (ensemble heads with bootstrap weights), ``train_dpo`` and
``train_ppo``; sampling is ``TransformersGenerator``, log-probs ``sequence_logprobs``.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from training.core.data import Demonstration, Messages, PreferencePair
from training.core.generation import GenerationOutput, TransformersGenerator
from training.core.losses import kl_k1, kl_k3
from training.core.modeling import (
    build_tiny_causal_lm,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    sequence_logprobs,
    set_seed,
)
from training.core.reward import (
    RewardConfig,
    preference_metrics,
    score_completions,
    score_pairs,
    train_reward_model,
)
from training.core.sft import SFTConfig, train_sft

# Single tokens of the tiny tokenizer (with their leading space), so a sampled token is a word,
# in order of how often the demonstrations use them (Zipf: rank r has weight 1 / r). The good
# words sit at ranks 2, 6, 10, 14, 18 and 22, from common to rare.
WORDS = (
    *("the", "good", "cat", "on", "a", "sky", "mat", "and", "dog", "blue", "my", "sat"),
    *("small", "light", "answer", "night", "fox", "sea", "time", "two", "four", "help"),
    *("five", "six"),
)
GOOD = frozenset(WORDS[1::4])
ZIPF = 1.0
# An answer of fewer words is scored as if padded to this many with non-good words: without
# it the best answer is a single good word, and PPO found exactly that (1.0 words per answer
# by round 5), a degenerate optimum that says little about learning which words are good.
MIN_WORDS = 4


# ---- the task ------------------------------------------------------------------------------


def gold_reward(text: str) -> float:
    """Good words / max(words, ``MIN_WORDS``): the share of good words of an answer of at
    least ``MIN_WORDS`` words, less for a shorter one; 0 for an empty answer."""
    words = text.split()
    return sum(w in GOOD for w in words) / max(len(words), MIN_WORDS)


def prompt(item: int) -> Messages:
    return [{"role": "user", "content": f"Write a line about item {item}."}]


def prompts(first: int, count: int) -> list[Messages]:
    """Prompts ``first .. first + count - 1``; disjoint ranges give disjoint prompt sets."""
    return [prompt(i) for i in range(first, first + count)]


def word_weights(zipf: float = ZIPF) -> list[float]:
    """How often the demonstrations use each word of ``WORDS``: proportional to rank^-zipf."""
    raw = [1.0 / (rank + 1) ** zipf for rank in range(len(WORDS))]
    return [w / sum(raw) for w in raw]


def sft_demonstrations(count: int, rng: random.Random, zipf: float = ZIPF) -> list[Demonstration]:
    """Answers of 4-10 words drawn with Zipf frequencies (gold reward 0.25 on average).

    Zipf, not uniform: natural text is Zipfian, and with every word equally common random
    pairs already show every word equally often, leaving nothing for uncertainty to find.
    """
    weights = word_weights(zipf)
    return [
        Demonstration(
            prompt(rng.randint(100_000, 199_999)),
            " ".join(rng.choices(WORDS, weights, k=rng.randint(4, 10))),
        )
        for _ in range(count)
    ]


# ---- the raters ----------------------------------------------------------------------------


def bt_probability(gold_a: float, gold_b: float, beta: float) -> float:
    """P(a rater prefers A over B) under Bradley-Terry on the gold reward."""
    return 1.0 / (1.0 + math.exp(-beta * (gold_a - gold_b)))


@dataclass
class Rater:
    """Answers with Bradley-Terry noise of inverse temperature ``beta``, from its own stream."""

    id: int
    beta: float
    rng: random.Random

    def prefers_a(self, a: str, b: str) -> bool:
        return self.rng.random() < bt_probability(gold_reward(a), gold_reward(b), self.beta)


class RaterPool:
    """``count`` raters with one ``beta``; each comparison goes to one drawn at random."""

    def __init__(self, count: int, beta: float, seed: int) -> None:
        self.raters = [Rater(i, beta, random.Random(seed * 1_000 + i)) for i in range(count)]
        self.pick = random.Random(seed * 1_000 + 999)

    def label(self, item: Messages, a: str, b: str) -> PreferencePair:
        """The pair as the rater answered it: the preferred answer is ``chosen``."""
        rater = self.pick.choice(self.raters)
        return PreferencePair(item, a, b) if rater.prefers_a(a, b) else PreferencePair(item, b, a)


def agreement_with_gold(labels: Sequence[PreferencePair]) -> float:
    """Share of labels that pick the gold-better answer (pairs of equal gold left out)."""
    strict = [p for p in labels if gold_reward(p.chosen) != gold_reward(p.rejected)]
    right = sum(gold_reward(p.chosen) > gold_reward(p.rejected) for p in strict)
    return right / len(strict) if strict else math.nan


def expected_inter_rater_agreement(pairs: Sequence[tuple[str, str]], beta: float) -> float:
    """How often two raters give a pair the same answer, p^2 + (1 - p)^2 averaged over pairs:
    the figure InstructGPT reports for its labellers (72.6-77.3%)."""
    ps = [bt_probability(gold_reward(a), gold_reward(b), beta) for a, b in pairs]
    return sum(p * p + (1 - p) * (1 - p) for p in ps) / len(ps) if ps else math.nan


@dataclass(frozen=True)
class Candidate:
    """Two answers to one prompt, not yet labelled."""

    prompt: Messages
    a: str
    b: str

    @property
    def gold_pair(self) -> PreferencePair:
        """The pair labelled by the gold reward (meaningful when the gold rewards differ)."""
        if gold_reward(self.a) >= gold_reward(self.b):
            return PreferencePair(self.prompt, self.a, self.b)
        return PreferencePair(self.prompt, self.b, self.a)


def consecutive_pairs(items: Sequence[Messages], texts: Sequence[str], n: int) -> list[Candidate]:
    """Samples (0, 1), (2, 3), ... of each prompt's ``n``; identical answers dropped."""
    out = []
    for i, item in enumerate(items):
        row = texts[i * n : (i + 1) * n]
        out += [Candidate(item, row[j], row[j + 1]) for j in range(0, n - 1, 2)]
    return [c for c in out if c.a != c.b]


def all_pairs(items: Sequence[Messages], texts: Sequence[str], n: int) -> list[Candidate]:
    """Every pair among each prompt's ``n`` samples; identical answers dropped."""
    out = []
    for i, item in enumerate(items):
        row = texts[i * n : (i + 1) * n]
        out += [Candidate(item, row[j], row[k]) for j in range(n) for k in range(j + 1, n)]
    return [c for c in out if c.a != c.b]


def gold_pairs(cands: Sequence[Candidate]) -> list[PreferencePair]:
    """Held-out pairs labelled by the gold reward; pairs of equal gold have no right answer."""
    return [c.gold_pair for c in cands if gold_reward(c.a) != gold_reward(c.b)]


# ---- models --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSettings:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    sft_demos: int = 2000
    sft_steps: int = 200
    sft_learning_rate: float = 3e-3
    max_new_tokens: int = 16
    max_length: int = 48
    max_prompt_length: int = 24


@dataclass(frozen=True)
class RewardSettings:
    ensemble: int = 4
    learning_rate: float = 1e-3
    batch_size: int = 16
    epochs: int = 6
    min_steps: int = 60
    # Without warm-up, full-size AdamW steps from the first step sometimes left a retraining
    # near 0.6 accuracy where the label counts either side of it reached about 0.8 (seen in
    # a few of ~60 retrainings while building this benchmark); a short warm-up calmed that.
    warmup_steps: int = 10


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Keep the trainers' progress lines off stderr (the benchmark trains dozens of models)."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def initial_policy(folder: Path, settings: ModelSettings, seed: int) -> Path:
    """A random tiny Llama fine-tuned on the Zipf word answers; returns its folder."""
    base = build_tiny_causal_lm(
        folder / "base",
        hidden=settings.hidden,
        layers=settings.layers,
        heads=settings.heads,
        seed=seed,
    )
    config = SFTConfig(
        model=str(base),
        output_dir=str(folder / "sft"),
        device="cpu",
        seed=seed,
        learning_rate=settings.sft_learning_rate,
        batch_size=32,
        max_steps=settings.sft_steps,
        max_length=settings.max_length,
        max_prompt_length=settings.max_prompt_length,
        resume=False,
    )
    demos = sft_demonstrations(settings.sft_demos, random.Random(seed))
    with quiet():
        train_sft(config, demos, load_causal_lm(base), load_tokenizer(base))
    return folder / "sft"


def sample(
    policy: nn.Module,
    tokenizer: Any,
    items: Sequence[Messages],
    *,
    n: int,
    settings: ModelSettings,
    seed: int,
) -> GenerationOutput:
    """``n`` answers per prompt at temperature 1, stopping at EOS."""
    generator = TransformersGenerator(
        policy, tokenizer, max_prompt_length=settings.max_prompt_length, batch_size=64
    )
    return generator.generate(items, n=n, max_new_tokens=settings.max_new_tokens, seed=seed)


@torch.no_grad()
def sampled_kl(out: GenerationOutput, reference: nn.Module) -> dict[str, float]:
    """KL(policy || reference) in nats per answer, on the policy's own samples ``out``.

    The estimators of ``training.core.dpo.sampled_kl`` (k1 = summed log-ratio, unbiased but
    can be negative; k3 unbiased and never negative), on samples the benchmark also scores for
    gold, so one set of samples gives both numbers.
    """
    _, ref_tokens = sequence_logprobs(
        reference, out.input_ids, out.attention_mask, out.full_completion_mask
    )  # (S, P+C-1)
    ref_tokens = ref_tokens[:, out.prompt_ids.shape[1] - 1 :]  # (S, C)
    mask = out.completion_mask  # (S, C)
    k1 = (kl_k1(out.logprobs, ref_tokens) * mask).sum(-1)  # (S,)
    k3 = (kl_k3(out.logprobs, ref_tokens) * mask).sum(-1)
    return {"kl_k1": float(k1.mean()), "kl_k3": float(k3.mean())}


def train_reward(
    labels: Sequence[PreferencePair],
    policy_dir: Path,
    out: Path,
    *,
    settings: RewardSettings,
    model_settings: ModelSettings,
    seed: int,
    normalize: bool = True,
) -> nn.Module:
    """A reward model with ``settings.ensemble`` heads on the initial policy's backbone (as
    InstructGPT starts its reward model from the SFT model), trained from scratch on
    ``labels`` for ``epochs`` passes, at least ``min_steps`` steps."""
    steps = max(settings.min_steps, math.ceil(settings.epochs * len(labels) / settings.batch_size))
    config = RewardConfig(
        model=str(policy_dir),
        output_dir=str(out),
        device="cpu",
        seed=seed,
        learning_rate=settings.learning_rate,
        batch_size=settings.batch_size,
        max_steps=steps,
        warmup_steps=settings.warmup_steps,
        max_length=model_settings.max_length,
        max_prompt_length=model_settings.max_prompt_length,
        ensemble_size=settings.ensemble,
        normalize=normalize,
        resume=False,
    )
    set_seed(seed)  # the fresh heads are drawn from the global RNG
    model = load_reward_model(policy_dir, num_labels=settings.ensemble)
    with quiet():
        train_reward_model(config, labels, model, load_tokenizer(policy_dir))
    return model.eval()


def reward_accuracy(
    model: nn.Module, tokenizer: Any, pairs: Sequence[PreferencePair], settings: ModelSettings
) -> float:
    """Share of gold-labelled pairs whose gold-better answer the reward model scores higher
    (``training.core.reward.preference_metrics``: the mean of the heads decides)."""
    if not pairs:
        return math.nan
    diffs = score_pairs(
        model,
        tokenizer,
        pairs,
        max_length=settings.max_length,
        max_prompt_length=settings.max_prompt_length,
        batch_size=64,
    )  # (N, K)
    metrics, _ = preference_metrics(diffs, pairs)
    return metrics["eval_accuracy"]


def answer_heads(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[Messages],
    texts: Sequence[str],
    n: int,
    settings: ModelSettings,
) -> torch.Tensor:
    """Raw head outputs (P, n, K) of each prompt's ``n`` answers, every answer scored once."""
    repeated = [item for item in items for _ in range(n)]
    logits = score_completions(
        model,
        tokenizer,
        repeated,
        list(texts),
        max_length=settings.max_length,
        max_prompt_length=settings.max_prompt_length,
        batch_size=64,
    )  # (P * n, K)
    return logits.view(len(items), n, -1)


def disagreement(diffs: torch.Tensor) -> torch.Tensor:
    """Ensemble disagreement about pairs, from raw head differences r_a,k - r_b,k (..., K):
    the population std over heads of sigmoid(r_a,k - r_b,k), the formula of the platform's
    ``uncertainty`` strategy (``training.services.candidates.pair_disagreement``; Christiano
    et al. 2017 pick queries by ensemble disagreement)."""
    return torch.sigmoid(diffs).std(-1, unbiased=False)
