"""Candidate generation, the loop's step between a new policy and the raters.

A ``generate`` run samples ``num_samples`` answers per prompt from the policy, registers them
as completions of a policy ``Source`` with the round's number, and pairs them into comparisons:

* ``new_vs_previous``: each new answer against an answer of the previous policy (written here
  by ``previous_model`` for prompts it never answered, e.g. a base model in round 1), the
  comparison that says whether the round made the policy better;
* ``two_samples``: pairs among the new answers of one prompt;
* ``uncertainty``: every pair among the new and previous answers of a prompt, scored by the
  reward model's ensemble heads; the pairs the heads disagree on most are kept and served first
  (``priority``), so raters label what the reward model would learn most from;
* ``none``: completions only.

A killed worker re-runs the whole task, so every write is idempotent: a prompt that already has
its samples from this source and round is skipped, each batch of completions is written in one
transaction (a batch is there entirely or not at all), and building a comparison twice is a
no-op (``comparisons_create`` skips existing pairs). The pure choices (which prompts, which
pairs, how uncertain) are small functions of their own, tested with hand-worked values.

torch and transformers are imported inside the functions that generate or score: this module
is imported wherever the run machinery is, including the web process.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.db import transaction
from django.db.models import Count

from annotation.models import (
    Campaign,
    Comparison,
    Completion,
    Prompt,
    Source,
    SourceKind,
    Split,
)
from annotation.services.items import (
    PairSpec,
    comparisons_create,
    completion_create,
    source_get_or_create,
)
from training.models import TrainingRun
from training.services.progress import Reporter

# Under ``training.core`` so that the handlers the run machinery and the demo's terminal attach
# there (the run's log tail) show generation progress too.
log = logging.getLogger("training.core.generate")


class Strategy:
    NEW_VS_PREVIOUS = "new_vs_previous"
    TWO_SAMPLES = "two_samples"
    UNCERTAINTY = "uncertainty"
    NONE = "none"
    CHOICES = (NEW_VS_PREVIOUS, TWO_SAMPLES, UNCERTAINTY, NONE)


class GenerateConfigError(ValueError):
    """A generate run's settings cannot work; the message names the setting."""


@dataclass(frozen=True)
class GenerateSettings:
    model: str
    source_name: str
    round_number: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    num_samples: int = 2
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8
    max_prompt_length: int = 256
    max_length: int = 512
    split: str = Split.TRAIN
    prompts_per_round: int = 0
    strategy: str = Strategy.NEW_VS_PREVIOUS
    previous_source: str = ""
    previous_model: str = ""
    reward_model: str = ""
    pairs_per_prompt: int = 2


def generate_settings(config: Mapping[str, Any]) -> GenerateSettings:
    """A generate run's settings from its config, with defaults; raises
    ``GenerateConfigError`` naming every setting that cannot work."""

    def get(key: str, default: Any) -> Any:
        value = config.get(key)
        return default if value is None else value

    round_number = config.get("round_number")
    settings = GenerateSettings(
        model=str(get("model", "")),
        source_name=str(get("source_name", "")).strip(),
        round_number=None if round_number is None else int(round_number),
        device=str(get("device", "auto")),
        dtype=str(get("dtype", "float32")),
        seed=int(get("seed", 0)),
        num_samples=int(get("num_samples", 2)),
        max_new_tokens=int(get("max_new_tokens", 64)),
        temperature=float(get("temperature", 1.0)),
        top_p=float(get("top_p", 1.0)),
        batch_size=int(get("batch_size", 8)),
        max_prompt_length=int(get("max_prompt_length", 256)),
        max_length=int(get("max_length", 512)),
        split=str(get("split", Split.TRAIN)),
        prompts_per_round=int(get("prompts_per_round", 0)),
        strategy=str(get("strategy", Strategy.NEW_VS_PREVIOUS)),
        previous_source=str(get("previous_source", "")).strip(),
        previous_model=str(get("previous_model", "")),
        reward_model=str(get("reward_model", "")),
        pairs_per_prompt=int(get("pairs_per_prompt", 2)),
    )
    problems = []
    if not settings.model:
        problems.append("model: required (a model folder or .gguf file)")
    if not settings.source_name:
        problems.append("source_name: required (the Source the completions are registered under)")
    for key in ("num_samples", "max_new_tokens", "batch_size", "pairs_per_prompt"):
        if getattr(settings, key) < 1:
            problems.append(f"{key}: must be at least 1")
    if settings.round_number is not None and settings.round_number < 0:
        problems.append("round_number: must not be negative")
    if settings.prompts_per_round < 0:
        problems.append("prompts_per_round: must be 0 (every prompt) or more")
    if not (math.isfinite(settings.temperature) and settings.temperature >= 0):
        problems.append("temperature: must be 0 (greedy) or more")
    if not 0 < settings.top_p <= 1:
        problems.append("top_p: must be in (0, 1]")
    if settings.split not in Split.values:
        problems.append(f"split: must be one of {', '.join(Split.values)}")
    if settings.strategy not in Strategy.CHOICES:
        problems.append(f"strategy: must be one of {', '.join(Strategy.CHOICES)}")
    if settings.strategy == Strategy.TWO_SAMPLES and settings.num_samples < 2:
        problems.append("num_samples: two_samples pairs new samples, so it needs at least 2")
    if settings.strategy == Strategy.UNCERTAINTY and not settings.reward_model:
        problems.append("reward_model: the uncertainty strategy scores pairs with a reward model")
    if settings.previous_model and not settings.previous_source:
        problems.append("previous_source: required with previous_model (its Source name)")
    if problems:
        raise GenerateConfigError("; ".join(problems))
    return settings


# -- pure choices ---------------------------------------------------------------------------------


def pick_prompts(ranked: Sequence[int], started: Collection[int], limit: int) -> list[int]:
    """The prompt ids a round answers, in id order.

    ``ranked``: the split's prompt ids, least covered first; ``started``: prompts this source
    already answered in this round. ``limit`` 0 takes every prompt. Started prompts come first
    so that a resumed run picks the same prompts as the attempt that died, even though the
    coverage it ranks by may have changed in between.
    """
    if limit <= 0:
        return sorted(ranked)
    chosen = [p for p in ranked if p in started][:limit]
    for prompt_id in ranked:
        if len(chosen) >= limit:
            break
        if prompt_id not in started:
            chosen.append(prompt_id)
    return sorted(chosen)


def pairs_new_vs_previous(
    new: Sequence[int], previous: Sequence[int], k: int
) -> list[tuple[int, int]]:
    """Up to ``k`` distinct (new, previous) pairs: first each new completion with a different
    previous one where there are enough, then the remaining cross pairs."""
    pairs = [
        (x, previous[(i + offset) % len(previous)])
        for offset in range(len(previous))
        for i, x in enumerate(new)
    ]
    return pairs[:k]


def pairs_within(new: Sequence[int], k: int) -> list[tuple[int, int]]:
    """Up to ``k`` pairs among one prompt's new samples: disjoint pairs first (1-2, 3-4, ...)
    so that each sample is compared before any is compared twice, then the other pairs."""
    disjoint = [(new[i], new[i + 1]) for i in range(0, len(new) - 1, 2)]
    rest = [pair for pair in itertools.combinations(new, 2) if pair not in disjoint]
    return (disjoint + rest)[:k]


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def pair_disagreement(heads_x: Sequence[float], heads_y: Sequence[float]) -> float:
    """How unsure the reward model is about x vs y, from raw head outputs (one per head).

    Each head k predicts P_k(x better) = sigmoid(r_x,k - r_y,k) (the Bradley-Terry likelihood it
    was trained on). With several heads, the uncertainty is the spread of those predictions
    (population std over heads; an ensemble's disagreement, Lakshminarayanan et al. 2017).
    One head has no spread, so closeness to a coin flip stands in: 0.5 - |P - 0.5|.
    """
    if len(heads_x) != len(heads_y) or not heads_x:
        raise ValueError("both completions need the same, non-zero number of head outputs")
    probs = [_sigmoid(a - b) for a, b in zip(heads_x, heads_y, strict=True)]
    if len(probs) == 1:
        return 0.5 - abs(probs[0] - 0.5)
    mean = sum(probs) / len(probs)
    return math.sqrt(sum((p - mean) ** 2 for p in probs) / len(probs))


def most_uncertain(
    pairs: Iterable[tuple[int, int]], heads: Mapping[int, Sequence[float]], k: int
) -> list[tuple[int, int, float]]:
    """The ``k`` pairs with the highest disagreement, as (x, y, disagreement), highest first;
    equal ones in pair order, so the choice is deterministic."""
    scored = [(x, y, pair_disagreement(heads[x], heads[y])) for x, y in pairs]
    scored.sort(key=lambda row: (-row[2], row[0], row[1]))
    return scored[:k]


# -- the run --------------------------------------------------------------------------------------


@dataclass
class _Progress:
    total: int
    done: int = 0


def generate_execute(*, run: TrainingRun, report: Reporter) -> dict[str, float]:
    """Generate a round's candidates and build its comparisons (see the module docstring).

    ``report(done, total, ...)`` is called after each batch of prompts is committed; it may raise
    ``RunCancelled``, which propagates with every finished batch kept. Returns the figures of
    this call: completions and comparisons created, prompts answered, and the mean length (in
    tokens) and EOS fraction of every completion this source wrote for them in this round.
    """
    settings = generate_settings(run.config)
    campaign = run.campaign
    source = source_get_or_create(name=settings.source_name, kind=SourceKind.POLICY)
    previous = _previous_source(settings, source)

    prompts = _round_prompts(campaign, settings, source)
    this_round = {"round_number": settings.round_number}
    have = _existing_samples([p.pk for p in prompts], source, this_round)
    new_jobs = [p for p in prompts if have.get(p.pk, 0) < settings.num_samples]
    previous_jobs: list[Prompt] = []
    pairs_with_previous = settings.strategy in (Strategy.NEW_VS_PREVIOUS, Strategy.UNCERTAINTY)
    if previous is not None and settings.previous_model and pairs_with_previous:
        # Any answer of the previous policy will do as the other side, whatever its round.
        answered = _existing_samples([p.pk for p in prompts], previous, {})
        previous_jobs = [p for p in prompts if not answered.get(p.pk)]

    progress = _Progress(total=len(new_jobs) + len(previous_jobs))
    log.info(
        "run %s: %d prompts (%d to answer, %d already answered), %d previous-policy samples",
        run.pk,
        len(prompts),
        len(new_jobs),
        len(prompts) - len(new_jobs),
        len(previous_jobs),
    )
    created = 0
    if new_jobs:
        created += _generate(
            model_path=settings.model,
            prompts=new_jobs,
            source=source,
            samples=settings.num_samples,
            count_filter=this_round,
            seed=settings.seed,
            settings=settings,
            run=run,
            report=report,
            progress=progress,
        )
    if previous_jobs:
        assert previous is not None
        created += _generate(
            model_path=settings.previous_model,
            prompts=previous_jobs,
            source=previous,
            samples=1,
            count_filter={},
            # Its own stream: the previous policy must not draw the new one's samples.
            seed=settings.seed + 7919,
            settings=settings,
            run=run,
            report=report,
            progress=progress,
        )

    comparisons = _build_comparisons(
        run=run, settings=settings, prompts=prompts, source=source, previous=previous
    )
    length, eos = _round_figures(prompts, source, settings.round_number)
    log.info("run %s: %d completions, %d comparisons created", run.pk, created, comparisons)
    return {
        "completions": float(created),
        "comparisons": float(comparisons),
        "prompts": float(len(prompts)),
        "mean_length": length,
        "eos_fraction": eos,
    }


def _previous_source(settings: GenerateSettings, source: Source) -> Source | None:
    if not settings.previous_source or settings.previous_source == source.name:
        return None
    if settings.previous_model:
        return source_get_or_create(name=settings.previous_source, kind=SourceKind.POLICY)
    return Source.objects.filter(name=settings.previous_source[:200]).first()


def _round_prompts(campaign: Campaign, settings: GenerateSettings, source: Source) -> list[Prompt]:
    """The split's prompts this round answers: all, or the ``prompts_per_round`` least covered
    (fewest comparisons), in id order."""
    prompts = Prompt.objects.filter(campaign=campaign, split=settings.split)
    ranked = list(
        prompts.annotate(coverage=Count("comparisons"))
        .order_by("coverage", "id")
        .values_list("id", flat=True)
    )
    started = set(
        Completion.objects.filter(
            prompt__in=prompts, source=source, round_number=settings.round_number
        ).values_list("prompt_id", flat=True)
    )
    ids = pick_prompts(ranked, started, settings.prompts_per_round)
    return list(Prompt.objects.filter(pk__in=ids).order_by("id"))


def _existing_samples(
    prompt_ids: Collection[int], source: Source, count_filter: Mapping[str, Any]
) -> dict[int, int]:
    """Prompt id -> completions ``source`` already wrote for it (matching ``count_filter``)."""
    return dict(
        Completion.objects.filter(prompt_id__in=prompt_ids, source=source, **count_filter)
        .values("prompt_id")
        .annotate(n=Count("id"))
        .values_list("prompt_id", "n")
    )


def _clean_text(text: str) -> str:
    # PostgreSQL cannot store NUL, and a byte-level tokenizer can decode one.
    return text.replace("\x00", "")


def _generate(
    *,
    model_path: str,
    prompts: Sequence[Prompt],
    source: Source,
    samples: int,
    count_filter: Mapping[str, Any],
    seed: int,
    settings: GenerateSettings,
    run: TrainingRun,
    report: Reporter,
    progress: _Progress,
) -> int:
    """Bring every prompt up to ``samples`` completions from ``source`` (counting those that
    match ``count_filter``), batch by batch; each batch is written in one transaction before it
    is reported. Returns the completions created."""
    from training.core.generation import TransformersGenerator
    from training.core.modeling import load_causal_lm, load_tokenizer, set_seed

    set_seed(seed)
    model = load_causal_lm(model_path, device=settings.device, dtype=settings.dtype)
    tokenizer = load_tokenizer(model_path)
    generator = TransformersGenerator(
        model,
        tokenizer,
        max_prompt_length=settings.max_prompt_length,
        batch_size=settings.batch_size,
    )
    created = 0
    try:
        for start in range(0, len(prompts), settings.batch_size):
            chunk = prompts[start : start + settings.batch_size]
            # Seeded by the batch's first prompt: a resumed run redraws a batch it lost the
            # same way whatever came before it.
            batch_seed = seed + chunk[0].pk
            out = generator.generate(
                [p.messages for p in chunk],
                n=samples,
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                seed=batch_seed,
            )  # rows i * samples .. i * samples + samples - 1 answer chunk[i]
            lengths = out.completion_mask.sum(-1).tolist()
            ended = out.ended_with_eos.tolist()
            generation = {
                "model": model_path,
                "temperature": settings.temperature,
                "top_p": settings.top_p,
                "max_new_tokens": settings.max_new_tokens,
                "seed": batch_seed,
                "run": run.pk,
            }
            kept: list[int] = []
            with transaction.atomic():
                # Lock the prompts, then count again: a duplicate delivery of this task writing
                # the same batch at the same moment waits here and then finds the samples
                # written, instead of adding a second set.
                ids = [p.pk for p in chunk]
                list(Prompt.objects.select_for_update().filter(pk__in=ids).values_list("pk"))
                have = _existing_samples(ids, source, count_filter)
                for i, prompt in enumerate(chunk):
                    for j in range(max(0, samples - have.get(prompt.pk, 0))):
                        row = i * samples + j
                        completion_create(
                            prompt=prompt,
                            text=_clean_text(out.texts[row]),
                            source=source,
                            generation={
                                **generation,
                                "tokens": int(lengths[row]),
                                "ended_with_eos": bool(ended[row]),
                            },
                            round_number=settings.round_number,
                        )
                        kept.append(row)
            created += len(kept)
            progress.done += len(chunk)
            batch_length = sum(lengths[r] for r in kept) / len(kept) if kept else 0.0
            batch_eos = sum(1 for r in kept if ended[r]) / len(kept) if kept else 0.0
            log.info(
                "run %s: %s generated %d/%d prompts",
                run.pk,
                source.name,
                progress.done,
                progress.total,
            )
            report(
                progress.done,
                progress.total,
                mean_length=float(batch_length),
                eos_fraction=float(batch_eos),
            )
    finally:
        del generator, model
        _free_memory()
    return created


def _free_memory() -> None:
    """Give the model's memory back before the next model loads (the previous policy, the
    reward model): two large models need not fit at once."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _round_figures(
    prompts: Sequence[Prompt], source: Source, round_number: int | None
) -> tuple[float, float]:
    """Mean length (tokens) and EOS fraction of this source's completions of the round, read
    back from their ``generation`` notes so a resumed run reports the whole round."""
    notes = Completion.objects.filter(
        prompt__in=prompts, source=source, round_number=round_number
    ).values_list("generation", flat=True)
    lengths, ended = [], []
    for note in notes:
        if isinstance(note, dict) and isinstance(note.get("tokens"), int):
            lengths.append(note["tokens"])
            ended.append(bool(note.get("ended_with_eos")))
    if not lengths:
        return 0.0, 0.0
    return sum(lengths) / len(lengths), sum(ended) / len(ended)


# -- comparisons ----------------------------------------------------------------------------------


def _ids_by_prompt(prompts: Sequence[Prompt], **filters: Any) -> dict[int, list[int]]:
    by_prompt: dict[int, list[int]] = {p.pk: [] for p in prompts}
    rows = (
        Completion.objects.filter(prompt__in=prompts, **filters)
        .order_by("prompt_id", "id")
        .values_list("prompt_id", "id")
    )
    for prompt_id, completion_id in rows:
        by_prompt[prompt_id].append(completion_id)
    return by_prompt


def _build_comparisons(
    *,
    run: TrainingRun,
    settings: GenerateSettings,
    prompts: Sequence[Prompt],
    source: Source,
    previous: Source | None,
) -> int:
    strategy = settings.strategy
    if strategy == Strategy.NONE or not prompts:
        return 0
    new = _ids_by_prompt(prompts, source=source, round_number=settings.round_number)
    old = _ids_by_prompt(prompts, source=previous) if previous is not None else {}
    k = settings.pairs_per_prompt
    if strategy == Strategy.NEW_VS_PREVIOUS and not any(old.values()):
        # Nothing to compare against (no previous policy named, or it answered none of these
        # prompts and no previous_model was given): the round's own samples are still worth
        # comparing.
        log.info("run %s: no previous-policy answers; pairing new samples instead", run.pk)
        strategy = Strategy.TWO_SAMPLES

    # Two answers with the same text make a comparison with nothing to decide (a policy that
    # barely moved often writes what its parent wrote): such pairs are never built.
    ids = {c for by in (new, old) for cs in by.values() for c in cs}
    texts = {
        pk: " ".join(text.split())
        for pk, text in Completion.objects.filter(pk__in=ids).values_list("pk", "text")
    }

    def differ(pairs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(x, y) for x, y in pairs if texts.get(x) != texts.get(y)]

    everything = len(ids) ** 2  # "no limit" for the pair choosers; ``k`` is applied after
    specs: list[PairSpec] = []
    if strategy == Strategy.NEW_VS_PREVIOUS:
        without = [p.pk for p in prompts if new[p.pk] and not old.get(p.pk)]
        if without:
            log.warning(
                "run %s: %d prompts have no answer from %s and get no comparisons",
                run.pk,
                len(without),
                settings.previous_source,
            )
        for prompt in prompts:
            chosen = pairs_new_vs_previous(new[prompt.pk], old.get(prompt.pk, []), everything)
            for x, y in differ(chosen)[:k]:
                specs.append(PairSpec(prompt_id=prompt.pk, completion_x=x, completion_y=y))
    elif strategy == Strategy.TWO_SAMPLES:
        for prompt in prompts:
            for x, y in differ(pairs_within(new[prompt.pk], everything))[:k]:
                specs.append(PairSpec(prompt_id=prompt.pk, completion_x=x, completion_y=y))
    else:
        specs = _uncertain_pairs(
            run=run, settings=settings, prompts=prompts, new=new, old=old, k=k, differ=differ
        )
    return comparisons_create(campaign=run.campaign, pairs=specs)


def _uncertain_pairs(
    *,
    run: TrainingRun,
    settings: GenerateSettings,
    prompts: Sequence[Prompt],
    new: Mapping[int, list[int]],
    old: Mapping[int, list[int]],
    k: int,
    differ: Callable[[Iterable[tuple[int, int]]], list[tuple[int, int]]],
) -> list[PairSpec]:
    fresh = {c for ids in new.values() for c in ids}
    candidates: dict[int, list[tuple[int, int]]] = {}
    for prompt in prompts:
        ids = sorted(set(new[prompt.pk]) | set(old.get(prompt.pk, [])))
        candidates[prompt.pk] = differ(itertools.combinations(ids, 2))
    # Pairs of two previous answers that raters were already asked about before this run are
    # not candidates again. Only comparisons older than the run count: a resumed run must see
    # the same candidates as the attempt that already wrote some of them.
    asked = set(
        Comparison.objects.filter(
            campaign=run.campaign, prompt__in=prompts, created_at__lt=run.created_at
        ).values_list("completion_a_id", "completion_b_id")
    )
    for prompt_id, pairs in candidates.items():
        candidates[prompt_id] = [
            (x, y) for x, y in pairs if (x in fresh or y in fresh) or (x, y) not in asked
        ]
    needed = sorted({c for pairs in candidates.values() for pair in pairs for c in pair})
    heads = _score_heads(settings, needed)
    specs = []
    for prompt in prompts:
        for x, y, disagreement in most_uncertain(candidates[prompt.pk], heads, k):
            specs.append(
                PairSpec(prompt_id=prompt.pk, completion_x=x, completion_y=y, priority=disagreement)
            )
    return specs


def _reward_lengths(folder: str, settings: GenerateSettings) -> tuple[int, int]:
    """The token limits the reward model was trained with (its saved run config), so that it
    scores the texts cut the way it learned them; the run's own limits otherwise."""
    from training.core.checkpoint import RUN_CONFIG_FILE

    path = Path(folder) / RUN_CONFIG_FILE
    trained: dict[str, Any] = {}
    if path.is_file():
        try:
            trained = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            trained = {}
    max_length = trained.get("max_length", settings.max_length)
    max_prompt_length = trained.get("max_prompt_length", settings.max_prompt_length)
    return int(max_length), int(max_prompt_length)


def _score_heads(
    settings: GenerateSettings, completion_ids: Sequence[int]
) -> dict[int, list[float]]:
    """Raw reward head outputs (one per head) of each completion under its prompt."""
    if not completion_ids:
        return {}
    from training.core.modeling import load_reward_model, load_tokenizer
    from training.core.reward import score_completions

    rows = list(
        Completion.objects.filter(pk__in=completion_ids)
        .order_by("id")
        .values_list("id", "text", "prompt__messages")
    )
    model = load_reward_model(settings.reward_model, device=settings.device, dtype=settings.dtype)
    tokenizer = load_tokenizer(settings.reward_model)
    max_length, max_prompt_length = _reward_lengths(settings.reward_model, settings)
    try:
        logits = score_completions(
            model,
            tokenizer,
            [messages for _, _, messages in rows],
            [text for _, text, _ in rows],
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            batch_size=settings.batch_size,
        )  # (N, K)
    finally:
        del model
        _free_memory()
    return {cid: logits[i].tolist() for i, (cid, _, _) in enumerate(rows)}
