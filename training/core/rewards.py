"""Reward sources for on-policy RL, behind one interface.

A reward source is called with the prompts (message lists) and the completions (text) of a
batch and returns one ``float`` or ``None`` per completion; ``None`` means "this source does
not apply here" (TRL's convention), and a completion no source applies to is unscorable.

* ``RewardModelSource``: a sequence-classification reward model reading prompt + completion,
  scored by ``reward.score_completions`` (tokenised exactly as reward training tokenises a
  pair's side) with the stored gain/bias applied (``reward.reward_from_logits``).
* ``FunctionSource``: any Python callable ``fn(prompts, completions, **columns)``; from the
  command line ``package.module:function``. This is how verifiers and rule-based rewards plug in.
* ``WeightedSumSource``: ``sum_k w_k * r_k`` over several sources (Mu et al. 2024, rule-based
  rewards: RM + weighted rule features), skipping the ones that return ``None``.
* ``RewardNormalizer``: gain and bias so that the scores of reference-policy samples have mean
  0 and std 1 (Ziegler et al. 2019; Huang et al. 2023, detail 9), or a running mean/std.

Spec strings (``--reward`` on the command line) are comma-separated terms, each an optional
``weight*`` followed by a model folder/name or ``module:function``, e.g.
``"runs/rm,0.5*my_rules:no_apologies"``.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from training.core.data import Messages
from training.core.modeling import load_reward_model, load_tokenizer
from training.core.reward import reward_from_logits, score_completions

RewardFn = Callable[..., Sequence[float | None]]


class RewardSource(Protocol):
    name: str

    def __call__(
        self,
        prompts: Sequence[Messages],
        completions: Sequence[str],
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[float | None]: ...


class RewardModelSource:
    """Scores with a sequence-classification reward model (mean of its heads, normalised)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int = 512,
        max_prompt_length: int = 256,
        batch_size: int = 16,
        name: str = "reward_model",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.name = name

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device = "cpu", **kwargs: Any
    ) -> RewardModelSource:
        return cls(load_reward_model(path, device=device), load_tokenizer(path), **kwargs)

    def __call__(
        self,
        prompts: Sequence[Messages],
        completions: Sequence[str],
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[float | None]:
        # Tokenised and pooled exactly as reward training scored a pair's side, and the
        # gain/bias it stored (checklist item 9) applied, so PPO sees the trained scale.
        logits = score_completions(
            self.model,
            self.tokenizer,
            prompts,
            completions,
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            batch_size=self.batch_size,
        )  # (N, K)
        return [float(s) for s in reward_from_logits(logits, self.model.config)]


class FunctionSource:
    """Wraps ``fn(prompts=..., completions=..., **columns) -> list[float | None]``.

    ``columns`` are the extra fields of the prompt lines (e.g. a reference ``answer``), one
    value per completion; only those the function's signature accepts are passed.
    """

    def __init__(self, fn: RewardFn, name: str | None = None) -> None:
        self.fn = fn
        self.name: str = name or str(getattr(fn, "__name__", "reward_fn"))
        params = list(inspect.signature(fn).parameters.values())
        # Columns a function does not name would be a TypeError, unless it takes **kwargs.
        self._takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        self._accepted = {p.name for p in params}

    def __call__(
        self,
        prompts: Sequence[Messages],
        completions: Sequence[str],
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[float | None]:
        extra = {
            k: list(v) for k, v in (columns or {}).items() if self._takes_any or k in self._accepted
        }
        out = list(self.fn(prompts=list(prompts), completions=list(completions), **extra))
        if len(out) != len(completions):
            raise ValueError(
                f"reward function {self.name} returned {len(out)} values for "
                f"{len(completions)} completions"
            )
        return [None if v is None else float(v) for v in out]


class WeightedSumSource:
    """``sum_k w_k * r_k``; ``None`` terms are left out, all ``None`` gives ``None`` (as TRL)."""

    def __init__(self, sources: Sequence[RewardSource], weights: Sequence[float]) -> None:
        if len(sources) != len(weights) or not sources:
            raise ValueError("WeightedSumSource needs one weight per source and at least one")
        self.sources = list(sources)
        self.weights = [float(w) for w in weights]
        self.name = "+".join(s.name for s in sources)
        self.last_components: dict[str, list[float | None]] = {}

    def __call__(
        self,
        prompts: Sequence[Messages],
        completions: Sequence[str],
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[float | None]:
        parts = [source(prompts, completions, columns) for source in self.sources]
        # Kept so trainers can log each component beside the total.
        self.last_components = {s.name: p for s, p in zip(self.sources, parts, strict=True)}
        totals: list[float | None] = []
        for i in range(len(completions)):
            terms = [w * p[i] for w, p in zip(self.weights, parts, strict=True) if p[i] is not None]  # type: ignore[operator]
            totals.append(sum(terms) if terms else None)
        return totals


class RewardNormalizer:
    """Affine map ``gain * r + bias`` so rewards are roughly mean 0, std 1.

    ``fit`` sets gain/bias from scores of reference-policy samples once, before training
    (Ziegler et al. 2019: ``g = 1 / std``, ``b = -mean / std``), so the scale the KL
    coefficient is tuned against is the same for every reward model. ``update`` instead keeps
    a running mean/std over all rewards seen (OpenRLHF's ``--reward.normalize_enable``).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        self.gain = 1.0
        self.bias = 0.0
        self.eps = eps
        self._count = 0
        self._mean = 0.0
        self._m2 = 0.0

    def fit(self, scores: Sequence[float]) -> None:
        values = torch.tensor(list(scores), dtype=torch.float64)
        mean, std = float(values.mean()), float(values.std(unbiased=False))
        self.gain = 1.0 / (std + self.eps)
        self.bias = -mean * self.gain

    def update(self, scores: Sequence[float]) -> None:
        """Chan et al.'s parallel update of the running mean and variance."""
        values = torch.tensor(list(scores), dtype=torch.float64)
        n = values.numel()
        if n == 0:
            return
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        total = self._count + n
        delta = batch_mean - self._mean
        self._mean += delta * n / total
        self._m2 += batch_m2 + delta**2 * self._count * n / total
        self._count = total
        std = math.sqrt(self._m2 / total)
        self.gain = 1.0 / (std + self.eps) if total > 1 else 1.0
        self.bias = -self._mean * self.gain

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return scores * self.gain + self.bias

    def state_dict(self) -> dict[str, float]:
        return {
            "gain": self.gain,
            "bias": self.bias,
            "count": float(self._count),
            "mean": self._mean,
            "m2": self._m2,
        }

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.gain, self.bias = float(state["gain"]), float(state["bias"])
        self._count, self._mean, self._m2 = int(state["count"]), state["mean"], state["m2"]


def score_tensor(
    source: RewardSource,
    prompts: Sequence[Messages],
    completions: Sequence[str],
    columns: Mapping[str, Sequence[Any]] | None = None,
) -> torch.Tensor:
    """Scores as a float tensor (N,), NaN where the source returned ``None``."""
    values = source(prompts, completions, columns)
    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)


def load_function(spec: str) -> RewardFn:
    """``package.module:function`` -> the function (the module must be importable)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward function must look like module:function, got {spec!r}")
    fn = importlib.import_module(module_name)
    for part in attr.split("."):
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"{spec} is not callable")
    return fn  # type: ignore[return-value]


def _is_function_spec(term: str) -> bool:
    """``pkg.mod:fn`` rather than a model folder (a path that exists always wins)."""
    module, sep, attr = term.partition(":")
    return (
        bool(sep)
        and bool(attr)
        and not Path(term).exists()
        and module.replace(".", "").replace("_", "").isalnum()
    )


def build_reward_source(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    max_length: int = 512,
    max_prompt_length: int = 256,
    functions: Mapping[str, RewardFn] | None = None,
) -> RewardSource:
    """Parse ``"[w*]term,[w*]term,..."``; a term is a model path or ``module:function``.

    ``functions`` maps names to callables for programmatic use (a term equal to a key uses it).
    One unweighted term returns that source itself, otherwise a ``WeightedSumSource``.
    """
    sources: list[RewardSource] = []
    weights: list[float] = []
    for raw in spec.split(","):
        term = raw.strip()
        if not term:
            continue
        weight = 1.0
        head, star, rest = term.partition("*")
        if star:
            try:
                weight = float(head)
            except ValueError:
                raise ValueError(f"bad reward weight {head!r} in {spec!r}") from None
            term = rest.strip()
        source: RewardSource
        if functions and term in functions:
            source = FunctionSource(functions[term], name=term)
        elif _is_function_spec(term):
            source = FunctionSource(load_function(term), name=term)
        else:
            source = RewardModelSource.from_pretrained(
                term,
                device=device,
                max_length=max_length,
                max_prompt_length=max_prompt_length,
                name=Path(term).name or term,
            )
        sources.append(source)
        weights.append(weight)
    if not sources:
        raise ValueError("no reward source given (--reward)")
    if len(sources) == 1 and weights[0] == 1.0:
        return sources[0]
    return WeightedSumSource(sources, weights)
