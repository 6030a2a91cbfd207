"""Critiques written by a critic model, shown to raters beside the answers (CriticGPT-style).

A ``critique`` run asks a model to point out what is wrong with each answer raters are about to
compare, and stores its reply as a ``Critique``. The reply is untrusted text: it is stored as
written (whitespace trimmed, length capped; templates escape it), and any passage it quotes
word for word from the answer is recorded as a span, so a page can highlight what the critic
pointed at.

Like candidate generation this re-runs whole after a lost worker, so it is idempotent: a
completion that already has a critique from this critic is skipped, and each batch is written
in one transaction.
"""

from __future__ import annotations

import gc
import logging
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.db import transaction
from django.db.models import Q

from annotation.models import Comparison, Completion, Critique
from annotation.services.items import critique_create
from training.models import TrainingRun
from training.services.progress import Reporter

log = logging.getLogger("training.core.critique")

DEFAULT_TEMPLATE = (
    "Question:\n{question}\n\nAnswer:\n{answer}\n\n"
    "In two sentences, point out any factual errors, missing steps or unsafe advice in the "
    "answer to the question. Quote the words you mean."
)
PLACEHOLDERS = ("question", "answer")
MAX_CRITIQUE_CHARS = 2000
MAX_SPANS = 10
# A quote shorter than this matches by accident too often to point at anything.
MIN_QUOTE_CHARS = 4
_QUOTES = re.compile(r'"([^"\n]+)"|\u201c([^\u201d\n]+)\u201d|`([^`\n]+)`')


class CritiqueConfigError(ValueError):
    """A critique run's settings cannot work; the message names the setting."""


def critique_template_check(template: Any) -> str:
    """``template`` if it is a usable critic instruction: both ``{question}`` and ``{answer}``,
    no other ``{...}`` field, no format spec or attribute access. Raises
    ``CritiqueConfigError`` naming the offending placeholder."""
    if not isinstance(template, str) or not template.strip():
        raise CritiqueConfigError("template: must be a non-empty text")
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as exc:
        raise CritiqueConfigError(
            f"template: {exc}; write a literal brace as {{{{ or }}}}"
        ) from exc
    for name, spec, conversion in fields:
        if name not in PLACEHOLDERS:
            # Also refuses {answer.__class__} and {answer[0]}: str.format would follow them.
            raise CritiqueConfigError(
                f"template: unknown placeholder {{{name}}}; only {{question}} and {{answer}} "
                "are filled in (write a literal brace as {{ or }})"
            )
        if spec or conversion:
            raise CritiqueConfigError(
                f"template: the {{{name}}} placeholder takes no conversion or format spec"
            )
    present = {name for name, _, _ in fields}
    for name in PLACEHOLDERS:
        if name not in present:
            raise CritiqueConfigError(f"template: the {{{name}}} placeholder is missing")
    return template


@dataclass(frozen=True)
class CritiqueSettings:
    model: str
    critic_name: str
    template: str = DEFAULT_TEMPLATE
    round_number: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 1.0
    batch_size: int = 8
    max_prompt_length: int = 512


def critique_settings(config: Mapping[str, Any]) -> CritiqueSettings:
    """A critique run's settings from its config, with defaults; raises
    ``CritiqueConfigError`` naming every setting that cannot work."""

    def get(key: str, default: Any) -> Any:
        value = config.get(key)
        return default if value is None else value

    model = str(get("model", ""))
    round_number = config.get("round_number")
    critic = str(get("critic_name", "")).strip() or f"critic:{Path(model).name or model}"
    settings = CritiqueSettings(
        model=model,
        critic_name=critic[:200],
        # An empty template (a form left blank) means the default one.
        template=config.get("template") or DEFAULT_TEMPLATE,
        round_number=None if round_number is None else int(round_number),
        device=str(get("device", "auto")),
        dtype=str(get("dtype", "float32")),
        seed=int(get("seed", 0)),
        max_new_tokens=int(get("max_new_tokens", 64)),
        temperature=float(get("temperature", 0.7)),
        top_p=float(get("top_p", 1.0)),
        batch_size=int(get("batch_size", 8)),
        max_prompt_length=int(get("max_prompt_length", 512)),
    )
    problems = []
    if not settings.model:
        problems.append("model: required (a model folder or .gguf file)")
    try:
        critique_template_check(settings.template)
    except CritiqueConfigError as exc:
        problems.append(str(exc))
    for key in ("max_new_tokens", "batch_size"):
        if getattr(settings, key) < 1:
            problems.append(f"{key}: must be at least 1")
    if settings.temperature < 0:
        problems.append("temperature: must be 0 (greedy) or more")
    if problems:
        raise CritiqueConfigError("; ".join(problems))
    return settings


# -- pure pieces ----------------------------------------------------------------------------------


def question_text(messages: Sequence[Mapping[str, str]]) -> str:
    """The conversation an answer replies to, as plain text: a single user turn as it is,
    several turns one per paragraph with the speaker named."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def critique_prompt(template: str, messages: Sequence[Mapping[str, str]], answer: str) -> str:
    """The critic's instruction. ``str.format`` does not look inside the values it substitutes,
    so braces in a question or an answer are text, not fields."""
    return template.format(question=question_text(messages), answer=answer)


def clean_critique(text: str) -> str:
    """Model output as stored: surrounding whitespace trimmed, NUL removed (PostgreSQL cannot
    store it), at most ``MAX_CRITIQUE_CHARS``."""
    return text.replace("\x00", "").strip()[:MAX_CRITIQUE_CHARS].rstrip()


def quoted_spans(critique: str, answer: str) -> list[dict[str, int]]:
    """Where the passages the critique quotes ("...", curly quotes or backticks) occur in the
    answer: ``[{start, end}]`` of each quote's first exact occurrence, in answer order."""
    spans: list[dict[str, int]] = []
    seen: set[tuple[int, int]] = set()
    for match in _QUOTES.finditer(critique):
        quote = next(g for g in match.groups() if g is not None).strip()
        if len(quote) < MIN_QUOTE_CHARS:
            continue
        start = answer.find(quote)
        if start < 0 or (start, start + len(quote)) in seen:
            continue
        seen.add((start, start + len(quote)))
        spans.append({"start": start, "end": start + len(quote)})
        if len(spans) >= MAX_SPANS:
            break
    return sorted(spans, key=lambda s: (s["start"], s["end"]))


# -- the run --------------------------------------------------------------------------------------


def _completions_to_critique(run: TrainingRun, settings: CritiqueSettings) -> list[int]:
    """Ids of the completions raters will see that have no critique from this critic yet: those
    in the campaign's comparisons, or with a round number, those in comparisons that involve a
    completion of that round (its new answers and the previous answers they face)."""
    comparisons = Comparison.objects.filter(campaign=run.campaign)
    if settings.round_number is not None:
        comparisons = comparisons.filter(
            Q(completion_a__round_number=settings.round_number)
            | Q(completion_b__round_number=settings.round_number)
        )
    return list(
        Completion.objects.filter(
            Q(pk__in=comparisons.values("completion_a_id"))
            | Q(pk__in=comparisons.values("completion_b_id"))
        )
        .exclude(critiques__critic=settings.critic_name)
        .order_by("id")
        .values_list("id", flat=True)
    )


def critique_execute(*, run: TrainingRun, report: Reporter) -> dict[str, float]:
    """Write one critique per compared completion that lacks one from ``critic_name``.

    ``report(done, total, ...)`` after each committed batch of completions; it may raise
    ``RunCancelled``, which propagates with every finished batch kept. Returns the critiques
    created, empty replies (not stored: a blank critique tells a rater nothing, and a rerun
    tries them again), the completions looked at and the mean critique length in tokens.
    """
    settings = critique_settings(run.config)
    todo = _completions_to_critique(run, settings)
    log.info("run %s: %d completions to critique as %s", run.pk, len(todo), settings.critic_name)
    if not todo:
        return {"critiques": 0.0, "empty": 0.0, "completions": 0.0, "mean_length": 0.0}

    from training.core.generation import TransformersGenerator
    from training.core.modeling import load_causal_lm, load_tokenizer, set_seed

    set_seed(settings.seed)
    model = load_causal_lm(settings.model, device=settings.device, dtype=settings.dtype)
    tokenizer = load_tokenizer(settings.model)
    generator = TransformersGenerator(
        model,
        tokenizer,
        max_prompt_length=settings.max_prompt_length,
        batch_size=settings.batch_size,
    )
    created = empty = 0
    lengths: list[int] = []
    try:
        for start in range(0, len(todo), settings.batch_size):
            ids = todo[start : start + settings.batch_size]
            completions = list(
                Completion.objects.filter(pk__in=ids).select_related("prompt").order_by("id")
            )
            if not completions:  # deleted since the list was read
                continue
            out = generator.generate(
                [
                    [
                        {
                            "role": "user",
                            "content": critique_prompt(
                                settings.template, c.prompt.messages, c.text
                            ),
                        }
                    ]
                    for c in completions
                ],
                n=1,
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                seed=settings.seed + ids[0],
            )
            tokens = out.completion_mask.sum(-1).tolist()
            batch_lengths: list[int] = []
            with transaction.atomic():
                # Lock, then look again: a duplicate delivery critiquing the same batch at the
                # same moment waits here and then skips what this one wrote.
                list(Completion.objects.select_for_update().filter(pk__in=ids).values_list("pk"))
                done = set(
                    Critique.objects.filter(
                        completion_id__in=ids, critic=settings.critic_name
                    ).values_list("completion_id", flat=True)
                )
                for completion, raw, n_tokens in zip(completions, out.texts, tokens, strict=True):
                    if completion.pk in done:
                        continue
                    text = clean_critique(raw)
                    if not text:
                        empty += 1
                        continue
                    critique_create(
                        completion=completion,
                        critic=settings.critic_name,
                        text=text,
                        spans=quoted_spans(text, completion.text),
                    )
                    batch_lengths.append(int(n_tokens))
            created += len(batch_lengths)
            lengths.extend(batch_lengths)
            finished = min(start + settings.batch_size, len(todo))
            log.info("run %s: critiqued %d/%d completions", run.pk, finished, len(todo))
            report(
                finished,
                len(todo),
                mean_length=sum(batch_lengths) / len(batch_lengths) if batch_lengths else 0.0,
            )
    finally:
        del generator, model
        _free_memory()
    return {
        "critiques": float(created),
        "empty": float(empty),
        "completions": float(len(todo)),
        "mean_length": sum(lengths) / len(lengths) if lengths else 0.0,
    }


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
