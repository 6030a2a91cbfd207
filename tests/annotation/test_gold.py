"""Gold items made by corrupting a good completion: each kind, its limits, and that no
corrupted copy carries a marker a rater could spot."""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from annotation.gold import (
    REFUSALS,
    Corruption,
    GoldCandidate,
    PlantedError,
    corrupt,
    make_gold,
    parse_planted_errors,
)

EGG = """Boiling an egg is simple, but the timing matters. Start with eggs straight from the fridge so the times below hold.

1. Place the eggs in a saucepan and cover them with cold water by about 2.5 cm.
2. Bring the water to a rolling boil over high heat. Then turn the heat down to a gentle simmer.
3. Cook for 6 minutes for a jammy yolk, or 10 minutes for a firm one.
4. Move the eggs to a bowl of ice water. Let them sit for 5 minutes before peeling.

Older eggs peel more easily than very fresh ones, e.g. eggs bought a week ago. Dr. Harold McGee explains why in his book on food science. The white becomes less acidic as the egg ages, which loosens the membrane."""

PYTHON = '''Here is a small function that returns the largest number in a list.

```python
def largest(numbers):
    """Return the largest number. Assumes the list is not empty."""
    best = numbers[0]

    for n in numbers[1:]:
        if n > best:
            best = n
    return best
```

The function starts with the first element. It then walks through the rest of the list and keeps whichever value is bigger. For an empty list, `numbers[0]` raises an `IndexError`, so you may want to check the length first. In practice you can also call the built-in `max()`, which does the same thing in one line.'''

SLEEP = """Here are a few habits that help most people sleep better:

- Go to bed and get up at the same time every day, even on weekends.
- Keep your bedroom cool, dark and quiet.
- Avoid coffee after 2 p.m. because caffeine stays in your body for hours.
- Put your phone away at least 30 minutes before bed.
- If you cannot fall asleep after 20 minutes, get up and read for a while.

Most adults need 7 to 9 hours of sleep a night. If poor sleep lasts for weeks, talk to your doctor."""

ANSWERS = (EGG, PYTHON, SLEEP)
SEEDS = range(40)


def _corrupt(
    text: str,
    kind: Corruption,
    seed: int,
    *,
    pool: Sequence[str] = (),
    planted_errors: Sequence[PlantedError | str] = (),
) -> str | None:
    return corrupt(text, kind, rng=random.Random(seed), pool=pool, planted_errors=planted_errors)


def _marker(line: str) -> str:
    """The line's indentation and list marker ("" for running text)."""
    match = re.match(r"\s*(?:[-*+]|\d+\.)\s", line)
    return match.group() if match else ""


def _code_block(text: str) -> str:
    match = re.search(r"```.*?```", text, flags=re.DOTALL)
    assert match is not None
    return match.group()


# truncate


@pytest.mark.parametrize("text", ANSWERS)
def test_truncate_cuts_at_a_word_boundary_between_35_and_65_percent(text: str) -> None:
    for seed in SEEDS:
        cut = _corrupt(text, Corruption.TRUNCATE, seed)
        assert cut is not None
        assert text.startswith(cut)
        assert 0.35 <= len(cut) / len(text) <= 0.65
        assert text[len(cut)] == " "
        assert cut[-1].isalnum()  # mid-sentence: no period, comma or ellipsis at the end


@pytest.mark.parametrize("text", ANSWERS)
def test_truncate_leaves_no_ellipsis_or_trailing_whitespace(text: str) -> None:
    for seed in SEEDS:
        cut = _corrupt(text, Corruption.TRUNCATE, seed)
        assert cut is not None
        assert cut == cut.rstrip()
        assert not cut.endswith(("...", "\u2026"))


def test_truncate_never_cuts_inside_a_code_block_or_inline_markup() -> None:
    text = "Use **bold text for the key step** and `some inline code here` when needed. " * 3
    for seed in SEEDS:
        cut = _corrupt(PYTHON, Corruption.TRUNCATE, seed)
        assert cut is not None
        assert cut.count("```") % 2 == 0
        marked = _corrupt(text, Corruption.TRUNCATE, seed)
        assert marked is not None
        assert marked.count("**") % 2 == 0
        assert marked.count("`") % 2 == 0


def test_truncate_returns_none_for_fewer_than_twelve_words() -> None:
    text = "Boil the egg for about nine minutes, then cool it in water."
    assert len(text.split()) == 12
    assert _corrupt(text, Corruption.TRUNCATE, 0) is not None
    assert _corrupt("Boil the egg for nine minutes, then cool it.", Corruption.TRUNCATE, 0) is None


def test_truncate_returns_none_when_the_middle_is_all_code() -> None:
    code = "\n".join(f"    total = total + value_{i}  # step {i}" for i in range(40))
    text = f"Add the values up.\n\n```python\n{code}\n```\n\nThat is all."
    assert _corrupt(text, Corruption.TRUNCATE, 0) is None


# swap


def test_swap_returns_another_answer_from_the_pool() -> None:
    pool = (EGG, f"  {EGG}\n", PYTHON, SLEEP)
    seen = {_corrupt(EGG, Corruption.SWAP, seed, pool=pool) for seed in SEEDS}
    assert seen == {PYTHON, SLEEP}


def test_swap_returns_none_without_a_different_answer_in_the_pool() -> None:
    assert _corrupt(EGG, Corruption.SWAP, 0) is None
    assert _corrupt(EGG, Corruption.SWAP, 0, pool=(EGG, EGG.replace(" ", "  "), " \n")) is None


# refusal


@pytest.mark.parametrize("text", ANSWERS)
def test_refusal_replaces_the_whole_answer(text: str) -> None:
    refusals = {_corrupt(text, Corruption.REFUSAL, seed) for seed in SEEDS}
    assert refusals <= set(REFUSALS)
    assert len(refusals) > 1


def test_refusal_matches_curly_apostrophes_of_the_original() -> None:
    text = "It\u2019s easy: boil water, add the egg, and wait nine minutes."
    for seed in SEEDS:
        refusal = _corrupt(text, Corruption.REFUSAL, seed)
        assert refusal is not None
        assert "'" not in refusal


def test_refusal_skips_an_answer_that_already_refuses() -> None:
    text = "I\u2019m sorry, but I can\u2019t share that. Maybe ask a pharmacist instead."
    assert _corrupt(text, Corruption.REFUSAL, 0) is None


# shuffle


@pytest.mark.parametrize("text", ANSWERS)
def test_shuffle_moves_sentences_within_their_paragraph(text: str) -> None:
    original_lines = text.split("\n")
    for seed in SEEDS:
        shuffled = _corrupt(text, Corruption.SHUFFLE, seed)
        assert shuffled is not None
        assert shuffled != text
        lines = shuffled.split("\n")
        assert len(lines) == len(original_lines)
        for line, original in zip(lines, original_lines, strict=True):
            assert sorted(line.split()) == sorted(original.split())
            assert _marker(line) == _marker(original)


def test_shuffle_keeps_a_fenced_code_block_intact() -> None:
    for seed in SEEDS:
        shuffled = _corrupt(PYTHON, Corruption.SHUFFLE, seed)
        assert shuffled is not None
        assert _code_block(shuffled) == _code_block(PYTHON)


def test_shuffle_does_not_split_at_abbreviations_or_decimals() -> None:
    sentences = [
        "Dr. Lee boils 1.5 litres of water, e.g. in a kettle.",
        "She adds the eggs at 7 a.m. sharp.",
        "They cook for 9.5 minutes!",
        "Is that too long?",
    ]
    text = " ".join(sentences)
    expected = {" ".join(order) for order in itertools.permutations(sentences)} - {text}
    for seed in SEEDS:
        assert _corrupt(text, Corruption.SHUFFLE, seed) in expected


def test_shuffle_keeps_numbered_steps_in_place_and_moves_their_sentences() -> None:
    text = "1. Fill a pot. Add the eggs.\n2. Boil them. Wait nine minutes.\n3. Cool them. Peel."
    for seed in SEEDS:
        shuffled = _corrupt(text, Corruption.SHUFFLE, seed)
        assert shuffled is not None
        assert [line[:3] for line in shuffled.split("\n")] == ["1. ", "2. ", "3. "]


def test_shuffle_reorders_paragraphs_when_each_has_one_sentence() -> None:
    paragraphs = ["Fill a pot with water.", "Bring it to a boil.", "Add the eggs."]
    text = "\n\n".join(paragraphs)
    for seed in SEEDS:
        shuffled = _corrupt(text, Corruption.SHUFFLE, seed)
        assert shuffled is not None
        parts = shuffled.split("\n\n")
        assert sorted(parts) == sorted(paragraphs)
        assert parts != paragraphs


def test_shuffle_leaves_headings_tables_and_quotes_alone() -> None:
    fixed = [
        "# Boiled eggs",
        "| Minutes | Yolk |",
        "|---|---|",
        "| 6 | Soft. Runny. |",
        "> Old advice. Still true. Mostly.",
    ]
    text = "\n".join(fixed) + "\n\nFill a pot. Add the eggs. Boil them.\n\n## Done"
    for seed in SEEDS:
        shuffled = _corrupt(text, Corruption.SHUFFLE, seed)
        assert shuffled is not None
        assert shuffled.split("\n")[:5] == fixed
        assert shuffled.endswith("\n\n## Done")


def test_shuffle_returns_none_for_fewer_than_three_sentences() -> None:
    assert _corrupt("Boil the egg. Then cool it.", Corruption.SHUFFLE, 0) is None
    assert _corrupt("Boil the egg.\n\nThen cool it.", Corruption.SHUFFLE, 0) is None


def test_shuffle_leaves_hard_wrapped_paragraphs_alone() -> None:
    text = "Boil the egg for nine\nminutes. Then cool it\nin cold water. Peel it\nwhen cool."
    assert _corrupt(text, Corruption.SHUFFLE, 0) is None


_WORDS = ("egg", "water", "pot", "salt", "timer", "lid", "shell", "yolk", "heat", "bowl")
_SENTENCE = st.builds(
    lambda words, end: " ".join(words).capitalize() + end,
    st.lists(st.sampled_from(_WORDS), min_size=1, max_size=6),
    st.sampled_from(".!?"),
)


@settings(max_examples=200, deadline=None)
@given(sentences=st.lists(_SENTENCE, min_size=3, max_size=8, unique=True), seed=st.integers())
def test_shuffle_never_returns_the_original_order(sentences: list[str], seed: int) -> None:
    shuffled = _corrupt(" ".join(sentences), Corruption.SHUFFLE, seed)
    assert shuffled is not None
    # Each sentence starts with the only capital it has and ends with its only punctuation,
    # so it occurs exactly once in the shuffled text.
    assert sorted(sentences, key=shuffled.index) != sentences
    assert len(shuffled) == len(" ".join(sentences))


# planted_error


def test_planted_substitution_replaces_one_whole_word_occurrence() -> None:
    text = "The cat sat on the mat. Use concatenate to join lists. The cat then slept."
    for seed in SEEDS:
        planted = _corrupt(text, Corruption.PLANTED_ERROR, seed, planted_errors=["cat => dog"])
        assert planted is not None
        assert planted.count("dog") == 1
        assert planted.count("cat ") == 1
        assert "concatenate" in planted


def test_planted_substitution_does_not_hit_part_of_a_word() -> None:
    text = "Use concatenate to join two lists into one, or the plus operator."
    errors = [PlantedError(find="cat", text="dog")]
    assert _corrupt(text, Corruption.PLANTED_ERROR, 0, planted_errors=errors) is None


def test_planted_statement_goes_after_a_sentence_never_first() -> None:
    statement = "Eggs need at least 45 minutes to cook through."
    for seed in SEEDS:
        planted = _corrupt(EGG, Corruption.PLANTED_ERROR, seed, planted_errors=[statement])
        assert planted is not None
        assert not planted.startswith(statement)
        before = planted[: planted.index(statement)]
        assert re.search(r"[.!?] $", before)
        assert planted.replace(" " + statement, "") == EGG


def test_planted_error_picks_one_that_applies() -> None:
    errors = ["penguin => ostrich", "6 minutes => 16 minutes"]
    for seed in SEEDS:
        planted = _corrupt(EGG, Corruption.PLANTED_ERROR, seed, planted_errors=errors)
        assert planted == EGG.replace("6 minutes", "16 minutes")


def test_planted_error_returns_none_when_nothing_applies() -> None:
    assert _corrupt(EGG, Corruption.PLANTED_ERROR, 0) is None
    errors = ["penguin => ostrich", "# just a comment"]
    assert _corrupt(EGG, Corruption.PLANTED_ERROR, 0, planted_errors=errors) is None


def test_parse_planted_errors_reads_substitutions_and_statements() -> None:
    text = (
        "# Errors for the egg campaign\n"
        "\n"
        "6 minutes => 16 minutes\n"
        "  Eggs  float when cooked  \n"
        "Salt makes water boil at 50 degrees!\n"
    )
    assert parse_planted_errors(text) == [
        PlantedError(find="6 minutes", text="16 minutes"),
        PlantedError(text="Eggs float when cooked."),
        PlantedError(text="Salt makes water boil at 50 degrees!"),
    ]


@pytest.mark.parametrize("line", ["=> dog", "cat =>", "  =>  ", "cat => cat"])
def test_parse_planted_errors_names_the_line_of_a_malformed_substitution(line: str) -> None:
    with pytest.raises(ValueError, match=r"^line 3: "):
        parse_planted_errors(f"# comment\nfine => ok\n{line}\n")


# make_gold, determinism, markers


def test_make_gold_returns_the_first_kind_that_applies_with_a_description() -> None:
    for seed in SEEDS:
        gold = make_gold(EGG, rng=random.Random(seed), kinds=[Corruption.SWAP, Corruption.TRUNCATE])
        assert gold is not None
        assert gold.kind is Corruption.TRUNCATE
        assert re.fullmatch(r"truncated at \d+% of its length", gold.description)


def test_make_gold_tries_the_kinds_in_random_order() -> None:
    kinds = set()
    for seed in SEEDS:
        gold = make_gold(
            EGG, rng=random.Random(seed), pool=[PYTHON], planted_errors=["egg => duck"]
        )
        assert gold is not None
        kinds.add(gold.kind)
    assert kinds == set(Corruption)


def test_make_gold_returns_none_when_no_kind_applies() -> None:
    kinds = [Corruption.TRUNCATE, Corruption.SHUFFLE, Corruption.SWAP, Corruption.PLANTED_ERROR]
    assert make_gold("Boil it for nine minutes.", rng=random.Random(0), kinds=kinds) is None


@pytest.mark.parametrize("kind", list(Corruption))
def test_the_same_seed_gives_the_same_corruption(kind: Corruption) -> None:
    pool = [PYTHON, SLEEP]
    errors = ["egg => duck", "Eggs are fruit."]

    def run(seed: int) -> str | None:
        return _corrupt(EGG, kind, seed, pool=pool, planted_errors=errors)

    def gold(seed: int) -> GoldCandidate | None:
        return make_gold(EGG, rng=random.Random(seed), pool=pool, planted_errors=errors)

    assert [run(seed) for seed in SEEDS] == [run(seed) for seed in SEEDS]
    assert len({run(seed) for seed in SEEDS}) > 1
    assert [gold(seed) for seed in SEEDS] == [gold(seed) for seed in SEEDS]


def test_no_corrupted_copy_carries_a_marker() -> None:
    markers = ("...", "\u2026", "[", "truncated", "corrupt", "gold", "  ", " \n", "\t")
    errors = ["egg => duck", "numbers => values", "Eggs are a kind of fruit."]
    for text, kind, seed in itertools.product(ANSWERS, Corruption, SEEDS):
        copy = _corrupt(text, kind, seed, pool=ANSWERS, planted_errors=errors)
        if copy is None:
            continue
        assert copy != text
        if kind is Corruption.SWAP:
            assert copy in ANSWERS  # a real answer: its brackets and spacing are its own
            continue
        assert copy == copy.strip()
        for marker in markers:
            if marker not in text.lower():
                assert marker not in copy.lower(), (kind, seed, marker)
