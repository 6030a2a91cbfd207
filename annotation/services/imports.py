"""JSONL import of prompts, prompts with candidate completions, and ready-made pairs.

All-or-nothing in one pass over the stream: lines are parsed and checked one at a time
(``annotation.formats``) and written in batches inside one transaction. At the first problem
the transaction is rolled back; reading then goes on without writing, only to report more
problems (up to ``formats.MAX_ERRORS``), so the user can fix a file in one round trip.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from django.conf import settings
from django.db import IntegrityError, transaction

from annotation import formats
from annotation.exceptions import ImportRejected
from annotation.formats import Item, LineError
from annotation.models import (
    Campaign,
    CampaignStatus,
    Completion,
    Critique,
    Prompt,
    Source,
)
from annotation.services.items import (
    PairingStrategy,
    PairSpec,
    choose_pairs,
    comparisons_create,
    source_get_or_create,
)

BATCH_LINES = 500


@dataclass(frozen=True)
class ImportReport:
    prompts: int = 0
    completions: int = 0
    comparisons: int = 0
    critiques: int = 0


class _Abort(Exception):
    """Leaves the transaction (rolling it back) once the file is known to be bad."""


class _Checker:
    """Per-line schema checks plus the cross-line ones: ids must be unique in the file."""

    def __init__(self, *, kind: str) -> None:
        self.kind = kind
        self.errors: list[LineError] = []
        self.fatal = False
        self._prompt_ids: dict[str, int] = {}
        self._completion_ids: dict[str, int] = {}

    @property
    def done(self) -> bool:
        return self.fatal or len(self.errors) >= formats.MAX_ERRORS

    def add(self, error: LineError) -> None:
        self.errors.append(error)
        self.fatal = self.fatal or error.fatal

    def items(self, lines: Iterable[tuple[int, Any]]) -> Iterator[tuple[int, Item]]:
        for line_no, value in lines:
            if isinstance(value, LineError):
                self.add(value)
            else:
                try:
                    item = formats.parse_item(value, kind=self.kind)
                except formats.FieldError as exc:
                    self.add(LineError(line_no, exc.field, exc.error))
                else:
                    duplicate = self._duplicate_id(line_no, item)
                    if duplicate is None:
                        yield line_no, item
                    else:
                        self.add(duplicate)
            if self.done:
                return

    def _duplicate_id(self, line_no: int, item: Item) -> LineError | None:
        prompt_id = formats.item_prompt(item).external_id
        if prompt_id:
            first = self._prompt_ids.setdefault(prompt_id, line_no)
            if first != line_no:
                return LineError(
                    line_no, "id", f"id {formats.shorten(prompt_id)!r} repeats line {first}"
                )
        field = "completions[{}].id" if self.kind == "candidates" else "{}.id"
        for i, completion in enumerate(formats.item_completions(item)):
            if not completion.external_id:
                continue
            first = self._completion_ids.setdefault(completion.external_id, line_no)
            if first != line_no or _repeats_in_line(item, i):
                where = field.format(i if self.kind == "candidates" else "ab"[i])
                return LineError(
                    line_no,
                    where,
                    f"completion id {formats.shorten(completion.external_id)!r} is used twice "
                    f"(first on line {first})",
                )
        return None


def _repeats_in_line(item: Item, index: int) -> bool:
    completions = formats.item_completions(item)
    key = completions[index].external_id
    return any(c.external_id == key for c in completions[:index])


class _Writer:
    def __init__(
        self,
        *,
        campaign: Campaign,
        kind: str,
        checker: _Checker,
        source_name_default: str,
        strategy: str,
        k: int,
        rng: random.Random,
    ) -> None:
        self.campaign = campaign
        self.kind = kind
        self.checker = checker
        self.source_name_default = source_name_default
        self.strategy = strategy
        self.k = k
        self.rng = rng
        self.sources: dict[str, Source] = {}
        self.counts = {"prompts": 0, "completions": 0, "comparisons": 0, "critiques": 0}

    def _source(self, name: str) -> Source:
        name = name or self.source_name_default
        if name not in self.sources:
            self.sources[name] = source_get_or_create(name=name)
        return self.sources[name]

    def write(self, batch: list[tuple[int, Item]]) -> None:
        wanted = {
            formats.item_prompt(item).external_id: line_no
            for line_no, item in batch
            if formats.item_prompt(item).external_id
        }
        if wanted:
            taken = Prompt.objects.filter(
                campaign=self.campaign, external_id__in=list(wanted)
            ).values_list("external_id", flat=True)
            for external_id in taken:
                self.checker.add(
                    LineError(
                        wanted[external_id],
                        "id",
                        f"a prompt with id {formats.shorten(external_id)!r} is already in "
                        "this campaign",
                    )
                )
            if self.checker.errors:
                return
        prompts = Prompt.objects.bulk_create(
            Prompt(
                campaign=self.campaign,
                messages=p.messages,
                external_id=p.external_id,
                split=p.split,
                metadata=p.metadata,
            )
            for p in (formats.item_prompt(item) for _, item in batch)
        )
        self.counts["prompts"] += len(prompts)
        if self.kind == "prompts":
            return

        specs: list[formats.CompletionItem] = []
        rows: list[Completion] = []
        for prompt, (_, item) in zip(prompts, batch, strict=True):
            for spec in formats.item_completions(item):
                specs.append(spec)
                rows.append(
                    Completion(
                        prompt=prompt,
                        text=spec.text,
                        source=self._source(spec.source),
                        generation=spec.generation,
                        external_id=spec.external_id,
                    )
                )
        completions = Completion.objects.bulk_create(rows)
        self.counts["completions"] += len(completions)
        critiques = Critique.objects.bulk_create(
            Critique(
                completion=completion,
                critic=spec.critique.critic,
                text=spec.critique.text,
                spans=spec.critique.spans,
            )
            for completion, spec in zip(completions, specs, strict=True)
            if spec.critique is not None
        )
        self.counts["critiques"] += len(critiques)

        pairs: list[PairSpec] = []
        if self.kind == "pairs":
            for i, (prompt, (_, item)) in enumerate(zip(prompts, batch, strict=True)):
                assert isinstance(item, formats.PairItem)
                a, b = completions[2 * i], completions[2 * i + 1]
                pairs.append(
                    PairSpec(
                        prompt_id=prompt.pk,
                        completion_x=a.pk,
                        completion_y=b.pk,
                        gold_choice=item.gold,
                    )
                )
        else:
            by_prompt: dict[int, list[int]] = {}
            for completion in completions:
                by_prompt.setdefault(completion.prompt_id, []).append(completion.pk)
            for prompt_id, ids in by_prompt.items():
                pairs.extend(
                    PairSpec(prompt_id=prompt_id, completion_x=x, completion_y=y)
                    for x, y in choose_pairs(ids, strategy=self.strategy, k=self.k, rng=self.rng)
                )
        self.counts["comparisons"] += comparisons_create(campaign=self.campaign, pairs=pairs)


def _batches(items: Iterator[tuple[int, Item]], size: int) -> Iterator[list[tuple[int, Item]]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


def _reject(message: str, *, field: str = "", line: int = 0) -> ImportRejected:
    return ImportRejected(message, errors=[{"line": line, "field": field, "error": message}])


def import_jsonl(
    *,
    campaign: Campaign,
    stream: BinaryIO,
    kind: str,
    source_name_default: str = "imported",
    strategy: str = PairingStrategy.ALL_PAIRS,
    k: int = 1,
    seed: int | None = None,
    limits: formats.Limits | None = None,
) -> ImportReport:
    """Import a JSONL file of ``kind`` ("prompts", "candidates" or "pairs") into ``campaign``.

    Candidates become comparisons by ``strategy`` (all pairs, or ``k`` random pairs per
    prompt, reproducible with ``seed``) in the same transaction. Raises ``ImportRejected``
    with up to 50 ``{"line", "field", "error"}`` entries when anything is wrong; then nothing
    at all was written. ``stream`` is read with bounded ``readline`` calls only.

    On SQLite the write lock is held while a valid file is read; PostgreSQL locks only the
    rows written, so raters keep working during a large import there.
    """
    if kind not in formats.KINDS:
        raise _reject(f"kind must be one of {', '.join(formats.KINDS)}", field="kind")
    if strategy not in PairingStrategy.CHOICES:
        raise _reject(
            f"strategy must be one of {', '.join(PairingStrategy.CHOICES)}", field="strategy"
        )
    if k < 1:
        raise _reject("k must be at least 1", field="k")
    source_name_default = source_name_default.strip()[: formats.MAX_NAME_CHARS] or "imported"
    if campaign.status == CampaignStatus.ARCHIVED:
        raise _reject("This campaign is archived; nothing can be imported into it.")
    limits = limits or formats.Limits(
        max_bytes=settings.IMPORT_MAX_BYTES, max_lines=settings.IMPORT_MAX_LINES
    )

    checker = _Checker(kind=kind)
    items = checker.items(formats.read_jsonl(stream, limits=limits))
    writer = _Writer(
        campaign=campaign,
        kind=kind,
        checker=checker,
        source_name_default=source_name_default,
        strategy=strategy,
        k=k,
        rng=random.Random(seed),
    )
    try:
        with transaction.atomic():
            for batch in _batches(items, BATCH_LINES):
                if not checker.errors:
                    try:
                        writer.write(batch)
                    except IntegrityError:
                        # Another import wrote the same prompt ids since this batch was
                        # checked; the transaction is broken, so leave it and report.
                        checker.add(
                            LineError(
                                batch[0][0],
                                "id",
                                "an id in this part of the file was imported at the same time "
                                "by someone else; nothing was written, try again",
                            )
                        )
                if checker.errors:
                    raise _Abort
            if checker.errors:
                raise _Abort
    except _Abort:
        for _ in items:  # nothing is written from here on; this only gathers errors
            pass
    if checker.errors:
        first = checker.errors[0]
        more = "" if len(checker.errors) == 1 else f" (and {len(checker.errors) - 1} more)"
        raise ImportRejected(
            f"Nothing was imported. Line {first.line}"
            + (f", {first.field}" if first.field else "")
            + f": {first.error}{more}",
            errors=[e.as_dict() for e in checker.errors],
        )
    if writer.counts["prompts"] == 0:
        raise _reject("The file has no records.", line=0)
    return ImportReport(**writer.counts)
