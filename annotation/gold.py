"""Automatically generated gold items: a good completion corrupted in a known way, so that
the original must win the comparison. Use them only for harmless prompts (refusing is wrong).

The copy must not give itself away: it adds no "...", "[truncated]", doubled spaces or trailing
whitespace, and paragraphs, list markers and fenced code blocks stay where they were.

- ``truncate``: cut at a space between two words, at 35-65% of the length in characters, after
  a letter or digit (so mid-sentence); never in a code block, heading or table, nor inside
  inline code, emphasis, a link or parentheses. Needs ``MIN_TRUNCATE_WORDS`` words.
- ``swap``: an answer to another prompt, from ``pool``.
- ``refusal``: the answer is *replaced* by a refusal; prepended, it would leave the full answer
  in place, a weak gold item.
- ``shuffle``: the sentences of each paragraph or list item are shuffled; when none has two,
  paragraphs and list items trade contents (markers and numbering stay put). Only lines that
  start and end a sentence take part: hard-wrapped lines and code stay as they are.
- ``planted_error``: one of the admin's planted errors (``parse_planted_errors``).

Pure functions, standard library only. Every random choice comes from the caller's ``rng``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class Corruption(StrEnum):
    TRUNCATE = "truncate"
    SWAP = "swap"
    REFUSAL = "refusal"
    SHUFFLE = "shuffle"
    PLANTED_ERROR = "planted_error"


@dataclass(frozen=True)
class GoldCandidate:
    """A corrupted copy of a completion; ``description`` tells the admin what was done."""

    kind: Corruption
    text: str
    description: str


@dataclass(frozen=True)
class PlantedError:
    """With ``find``: replace one whole-word occurrence of ``find`` by ``text``.
    Without: insert ``text``, a false statement, after some sentence."""

    text: str
    find: str | None = None


MIN_TRUNCATE_WORDS = 12
TRUNCATE_WINDOW = (0.35, 0.65)
REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "I'm sorry, but I can't assist with that.",
    "Unfortunately, I'm not able to help with this request.",
    "I apologize, but I can't provide help with that.",
    "Sorry, I can't help with that. Is there something else I can do for you?",
    "I'm not able to help with that request, but I'm happy to help with something else.",
    "I'm afraid I can't help with that one.",
)
_REFUSAL_STARTS = ("i'm sorry", "sorry,", "i can't", "i cannot", "i apologize", "i'm afraid")

# "Dr. Smith" and "e.g. eggs" end no sentence. Dotted abbreviations ("e.g.", "a.m."),
# initials and bare numbers ("step 3.") are caught by pattern in _is_abbreviation.
_ABBREVIATIONS = frozenset(
    {"dr.", "mr.", "mrs.", "ms.", "prof.", "sr.", "jr.", "st.", "vs.", "etc.", "approx."}
    | {"fig.", "inc.", "ltd.", "co.", "cf.", "al.", "vol."}
)
_PREFIX = re.compile(r"(\s*)((?:[-*+]|\d{1,3}[.)])\s+)?")  # indentation, list marker
_CLOSERS = "\"'\u201d\u2019)\\]*_"
_TERMINAL = re.compile(rf"[.!?][{_CLOSERS}]*$")
_ENDS_CLAUSE = re.compile(rf"[.!?:][{_CLOSERS}]*$")
_BOUNDARY = re.compile(rf"[.!?][{_CLOSERS}]*\s+")
_OPENERS = "\"'\u201c\u2018([*_`"
_FENCES = ("```", "~~~")


def _split_prefix(line: str) -> tuple[str, bool]:
    """The line's indentation and list marker, and whether it has a list marker."""
    match = _PREFIX.match(line)
    assert match is not None  # every part of the pattern is optional
    return match.group(), match.group(2) is not None


def _line_kinds(lines: list[str]) -> list[str]:
    """Per line: "code" (a fence or inside one), "blank", "fixed" (heading, table, quote,
    HTML, rule, indented code) or "text". An unclosed fence makes the rest code."""
    kinds = []
    in_fence = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith(_FENCES):
            in_fence = not in_fence
            kinds.append("code")
        elif in_fence:
            kinds.append("code")
        elif not stripped:
            kinds.append("blank")
        elif (
            stripped.startswith(("#", "|", ">", "<"))
            or set(stripped) <= set("-*_= ")
            or (line.startswith(("    ", "\t")) and not _split_prefix(line)[1])
        ):
            kinds.append("fixed")
        else:
            kinds.append("text")
    return kinds


def _is_abbreviation(word: str) -> bool:
    word = word.lstrip(_OPENERS).lower()
    return word in _ABBREVIATIONS or re.fullmatch(r"(?:[a-z]\.)+|\d+\.", word) is not None


def _balanced(text: str) -> bool:
    """Whether ``text`` closes every inline code span, emphasis, link and parenthesis it opens
    (by count: enough to keep markdown from showing a stray ``*`` or backtick)."""
    return (
        text.count("`") % 2 == 0
        and text.count("**") % 2 == 0
        and text.replace("**", "").count("*") % 2 == 0
        and text.count("[") == text.count("]")
        and text.count("(") == text.count(")")
    )


def _split_sentences(content: str) -> list[str]:
    """Sentences of one line of running text. Splits after . ! ? (and closing quotes,
    brackets, emphasis) followed by whitespace and a capital or digit, but not after an
    abbreviation, initial or bare number. Decimals (3.5) have no space, so never split.
    Returns ``[content]`` when a split would tear inline code, emphasis or brackets apart."""
    sentences = []
    start = 0
    for match in _BOUNDARY.finditer(content):
        rest = content[match.end() :].lstrip(_OPENERS)
        if not rest or not (rest[0].isupper() or rest[0].isdigit()):
            continue
        last_word = content[start : match.start() + 1].split()[-1]
        if content[match.start()] == "." and _is_abbreviation(last_word):
            continue
        sentences.append(content[start : match.end()].rstrip())
        start = match.end()
    sentences.append(content[start:])
    return sentences if all(_balanced(s) for s in sentences) else [content]


def _prose_lines(lines: list[str]) -> dict[int, tuple[str, list[str], str]]:
    """The lines, by index, whose sentences may be moved or added to, as (indentation and list
    marker, sentences, trailing whitespace): running text or list items that start a sentence
    and end one. Lines of a hard-wrapped paragraph do neither."""
    kinds = _line_kinds(lines)
    found = {}
    for i, line in enumerate(lines):
        if kinds[i] != "text":
            continue
        prefix, is_item = _split_prefix(line)
        content = line[len(prefix) :].rstrip()
        starts_sentence = (
            is_item
            or i == 0
            or kinds[i - 1] != "text"
            or _ENDS_CLAUSE.search(lines[i - 1].rstrip()) is not None
        )
        if (
            starts_sentence
            and _TERMINAL.search(content)
            and not _is_abbreviation(content.split()[-1])
        ):
            suffix = line[len(prefix) + len(content) :]
            found[i] = (prefix, _split_sentences(content), suffix)
    return found


def _reordered(items: list[str], rng: random.Random) -> list[str]:
    """A random order of ``items`` other than the given one. Needs two distinct items."""
    shuffled = rng.sample(items, len(items))
    if shuffled == items:
        # A rotation by one changes every list that is not all one value.
        shuffled = items[1:] + items[:1]
    return shuffled


def _truncate(text: str, rng: random.Random) -> tuple[str, str] | None:
    if len(text.split()) < MIN_TRUNCATE_WORDS:
        return None
    low, high = TRUNCATE_WINDOW
    cuts = []
    offset = 0
    lines = text.split("\n")
    for line, kind in zip(lines, _line_kinds(lines), strict=True):
        if kind == "text":
            start = len(_split_prefix(line)[0])
            for space in re.finditer(r"(?<=[^\W_]) (?=\S)", line):
                at = offset + space.start()
                within = space.start() > start and low <= at / len(text) <= high
                if within and _balanced(line[start : space.start()]):
                    cuts.append(at)
        offset += len(line) + 1
    if not cuts:
        return None
    at = rng.choice(cuts)
    return text[:at], f"truncated at {round(100 * at / len(text))}% of its length"


def _swap(text: str, pool: Sequence[str], rng: random.Random) -> tuple[str, str] | None:
    original = " ".join(text.split())
    usable = [p.strip() for p in pool if p.strip() and " ".join(p.split()) != original]
    if not usable:
        return None
    return rng.choice(usable), "replaced by an answer to another prompt"


def _refusal(text: str, rng: random.Random) -> tuple[str, str] | None:
    if text.lstrip().replace("\u2019", "'").lower().startswith(_REFUSAL_STARTS):
        return None  # Already a refusal: a swap for another refusal proves nothing.
    phrase = rng.choice(REFUSALS)
    if "\u2019" in text and "'" not in text:
        phrase = phrase.replace("'", "\u2019")  # match the original's apostrophes
    return phrase, f'replaced by the refusal "{phrase}"'


def _shuffle(text: str, rng: random.Random) -> tuple[str, str] | None:
    lines = text.split("\n")
    prose = _prose_lines(lines)
    if sum(len(sentences) for _, sentences, _ in prose.values()) < 3:
        return None
    groups = [sentences for _, sentences, _ in prose.values() if len(set(sentences)) > 1]
    if groups:
        forced = rng.randrange(len(groups))  # this one surely changes; the rest may not
        for n, sentences in enumerate(groups):
            if n == forced:
                sentences[:] = _reordered(sentences, rng)
            else:
                rng.shuffle(sentences)
        what = "the sentences in {} paragraph(s)"
    else:
        contents = [" ".join(sentences) for _, sentences, _ in prose.values()]
        if len(set(contents)) < 2:
            return None
        for (_, sentences, _), content in zip(
            prose.values(), _reordered(contents, rng), strict=True
        ):
            sentences[:] = [content]
        what = "the order of {} paragraphs"
    changed = 0
    for i, (prefix, sentences, suffix) in prose.items():
        line = prefix + " ".join(sentences) + suffix
        changed += line != lines[i]
        lines[i] = line
    return "\n".join(lines), "shuffled " + what.format(changed)


def _plant(text: str, error: PlantedError, rng: random.Random) -> tuple[str, str] | None:
    if error.find is not None:
        pattern = rf"(?<!\w){re.escape(error.find)}(?!\w)"
        hits = [m.start() for m in re.finditer(pattern, text)]
        if not hits:
            return None
        at = rng.choice(hits)
        corrupted = text[:at] + error.text + text[at + len(error.find) :]
        return corrupted, f'replaced "{error.find}" with "{error.text}"'
    lines = text.split("\n")
    prose = _prose_lines(lines)
    # After sentence k (k >= 1) of some line: never the first sentence of the answer.
    slots = [(i, k) for i, (_, s, _) in prose.items() for k in range(1, len(s) + 1)]
    if not slots:
        return None
    i, k = rng.choice(slots)
    prefix, sentences, suffix = prose[i]
    lines[i] = prefix + " ".join([*sentences[:k], error.text, *sentences[k:]]) + suffix
    return "\n".join(lines), f'inserted the false statement "{error.text}"'


def _parse_line(line: str, number: int) -> PlantedError | None:
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    if "=>" in line:
        find, _, replace = (part.strip() for part in line.partition("=>"))
        if not find or not replace:
            raise ValueError(f"line {number}: write 'find => replace', with both sides filled in")
        if find == replace:
            raise ValueError(f"line {number}: find and replace are the same")
        return PlantedError(text=replace, find=find)
    statement = " ".join(line.split())
    if not _TERMINAL.search(statement):
        statement += "."
    return PlantedError(text=statement)


def parse_planted_errors(text: str) -> list[PlantedError]:
    """The admin's planted errors, one per line: ``find => replace`` (split at the first
    ``=>``) or a false statement, to which a period is added when it has no final . ! or ?.
    Blank lines and lines starting with ``#`` are skipped.

    Raises ``ValueError`` naming the line ("line 3: ...") when find or replace is empty, or
    both are the same."""
    errors = [_parse_line(line, n) for n, line in enumerate(text.splitlines(), start=1)]
    return [error for error in errors if error is not None]


def _apply(
    text: str,
    kind: Corruption,
    *,
    rng: random.Random,
    pool: Sequence[str],
    planted_errors: Sequence[PlantedError | str],
) -> tuple[str, str] | None:
    result: tuple[str, str] | None = None
    if kind is Corruption.TRUNCATE:
        result = _truncate(text, rng)
    elif kind is Corruption.SWAP:
        result = _swap(text, pool, rng)
    elif kind is Corruption.REFUSAL:
        result = _refusal(text, rng)
    elif kind is Corruption.SHUFFLE:
        result = _shuffle(text, rng)
    elif kind is Corruption.PLANTED_ERROR:
        parsed = [
            e if isinstance(e, PlantedError) else _parse_line(e, n)
            for n, e in enumerate(planted_errors, start=1)
        ]
        usable = [e for e in parsed if e is not None]
        for error in rng.sample(usable, len(usable)):
            result = _plant(text, error, rng)
            if result is not None:
                break
    # A copy that differs only in whitespace is no gold item.
    if result is None or result[0].split() == text.split():
        return None
    return result


def corrupt(
    text: str,
    kind: Corruption,
    *,
    rng: random.Random,
    pool: Sequence[str] = (),
    planted_errors: Sequence[PlantedError | str] = (),
) -> str | None:
    """``text`` corrupted by ``kind``, or ``None`` when that kind does not apply to it.

    The result never equals ``text``, even up to whitespace. ``pool`` holds answers to other
    prompts (for ``swap``). ``planted_errors`` holds parsed entries or raw lines in the
    format of ``parse_planted_errors`` (a malformed raw line raises its ``ValueError``); one
    that applies is picked at random. The same ``rng`` state gives the same result."""
    result = _apply(text, Corruption(kind), rng=rng, pool=pool, planted_errors=planted_errors)
    return None if result is None else result[0]


def make_gold(
    text: str,
    *,
    rng: random.Random,
    kinds: Sequence[Corruption] = tuple(Corruption),
    pool: Sequence[str] = (),
    planted_errors: Sequence[PlantedError | str] = (),
) -> GoldCandidate | None:
    """A gold candidate from the first of ``kinds``, in random order, that applies to
    ``text``; ``None`` when none does. Arguments as for ``corrupt``."""
    order = [Corruption(kind) for kind in kinds]
    rng.shuffle(order)
    for kind in order:
        result = _apply(text, kind, rng=rng, pool=pool, planted_errors=planted_errors)
        if result is not None:
            return GoldCandidate(kind=kind, text=result[0], description=result[1])
    return None
