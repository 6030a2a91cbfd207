"""Simulated raters of known quality: do the quality figures find them, and does it pay?

The "Proof" benchmark of the quality features. Raters of known kinds label comparisons of a
synthetic text task whose hidden true reward is known:

* careful (accuracy 0.90-0.95) and noisy (0.65-0.75) raters pick the truly better output with
  their accuracy;
* always-left raters pick the output shown on the left; sides are randomised 50/50, so in
  canonical A/B terms their choice is a coin flip with respect to the truth;
* random spammers pick A or B uniformly, one fast and one as slow as a careful rater (so that
  only the statistics, not the clock, can give it away);
* a length-biased rater always picks the longer output (length is uncorrelated with the
  reward here).

Then, with the pure functions of ``annotation.quality`` (no Django, no database):

(a) Dawid-Skene on the judgments: Spearman rank correlation between each rater's accuracy and
    the estimated reliability (goal >= 0.9), and the training weight ``judgment_weight``;
(b) ``rater_stats`` + ``rater_flags``: which raters are flagged, and why (goal: every
    spammer, always-left and length-biased rater flagged; no careful or noisy rater);
(c) reward models trained with ``training.core`` on the same judgments written as JSONL with a
    per-judgment ``weight``, once weighted and once with ``use_weights=False`` (same seed,
    data, steps), plus a reference trained on the true labels; gold accuracy on held-out pairs
    labelled by the true reward, over several seeds and rater mixes.

The task: a completion is 5-12 filler words with 0-2 copies of "blue" and 0-2 of "dark"
inserted; its true reward is #blue - #dark. A comparison pairs two completions with different
rewards. The tiny reward model (2-layer Llama, hidden 64, in-process BPE) must learn to count.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality_sim.py            # ~2.5 min, 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality_sim.py --quick    # < 1 min
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotation.quality import (
    JudgmentRecord,
    Rating,
    dawid_skene,
    judgment_weight,
    rater_flags,
    rater_stats,
    spearman,
)
from benchmarks._training_common import (
    command_line,
    log,
    machine,
    machine_line,
    save_results,
    table,
)

FILLER = str.split(
    "the cat sat on a mat and dog ran far away from home with my friend red green "
    "sea wide deep sky light small robot good answer short kind"
)
GOOD, BAD = "blue", "dark"
HONEST = ("careful", "noisy")
JUNK = ("left", "spammer", "longer")

# ---- the task ----------------------------------------------------------------------------------


def true_reward(text: str) -> int:
    words = text.split()
    return words.count(GOOD) - words.count(BAD)


def completion(rng: random.Random) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(5, 12))]
    for keyword in [GOOD] * rng.randint(0, 2) + [BAD] * rng.randint(0, 2):
        words.insert(rng.randint(0, len(words)), keyword)
    return " ".join(words)


@dataclass(frozen=True)
class Comparison:
    id: int
    prompt: str
    a: str
    b: str
    gold: bool  # a gold item: its answer is known to the campaign

    @property
    def truth(self) -> str:
        return "a" if true_reward(self.a) > true_reward(self.b) else "b"

    @property
    def a_longer(self) -> bool | None:
        return None if len(self.a) == len(self.b) else len(self.a) > len(self.b)


def comparisons(n: int, rng: random.Random, *, gold_fraction: float = 0.0) -> list[Comparison]:
    out = []
    while len(out) < n:
        a, b = completion(rng), completion(rng)
        if true_reward(a) != true_reward(b):
            prompt = f"Write something about item {rng.randint(1, 999)}."
            out.append(Comparison(len(out), prompt, a, b, rng.random() < gold_fraction))
    return out


# ---- the raters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rater:
    id: str
    kind: str  # careful, noisy, left, spammer, longer
    accuracy: float  # P(the truly better side) by design; 0.5 for every junk kind
    median_ms: float

    def choose(self, c: Comparison, left_was_a: bool, rng: random.Random) -> str:
        if self.kind in HONEST:
            right = rng.random() < self.accuracy
            return c.truth if right else ("b" if c.truth == "a" else "a")
        if self.kind == "left":
            return "a" if left_was_a else "b"
        if self.kind == "longer" and c.a_longer is not None:
            return "a" if c.a_longer else "b"
        return rng.choice("ab")


def spread(low: float, high: float, n: int) -> list[float]:
    return [high - (high - low) * i / max(n - 1, 1) for i in range(n)]


def rater_pool(mix: Sequence[int]) -> list[Rater]:
    """``mix``: how many careful, noisy, always-left, spammer and length-biased raters."""
    careful, noisy, left, spammers, longer = mix
    pool = [
        Rater(f"careful-{i + 1}", "careful", a, 9000)
        for i, a in enumerate(spread(0.90, 0.95, careful))
    ]
    pool += [
        Rater(f"noisy-{i + 1}", "noisy", a, 6000) for i, a in enumerate(spread(0.65, 0.75, noisy))
    ]
    pool += [Rater(f"left-{i + 1}", "left", 0.5, 4000) for i in range(left)]
    # Spammers alternate fast (a clicker) and slow (as slow as a careful rater).
    pool += [
        Rater(f"spammer-{i + 1}", "spammer", 0.5, 1200 if i % 2 == 0 else 9000)
        for i in range(spammers)
    ]
    pool += [Rater(f"longer-{i + 1}", "longer", 0.5, 5000) for i in range(longer)]
    return pool


@dataclass(frozen=True)
class Judgment:
    comparison: Comparison
    rater: Rater
    choice: str  # canonical a / b
    left_was_a: bool
    decision_ms: int


def simulate(
    items: Sequence[Comparison], pool: Sequence[Rater], overlap: int, rng: random.Random
) -> list[Judgment]:
    """``overlap`` distinct raters per comparison, drawn uniformly; sides randomised."""
    out = []
    for c in items:
        for rater in rng.sample(list(pool), overlap):
            left_was_a = rng.random() < 0.5
            ms = int(rater.median_ms * math.exp(0.4 * rng.gauss(0, 1)))
            out.append(Judgment(c, rater, rater.choose(c, left_was_a, rng), left_was_a, ms))
    return out


# ---- (a) + (b): Dawid-Skene and flags ------------------------------------------------------------


@dataclass
class QualityReport:
    spearman_reliability: float  # against designed accuracy
    spearman_weight: float
    spearman_realised: float  # reliability against each rater's realised accuracy
    rows: list[dict[str, Any]] = field(default_factory=list)


def quality_report(judgments: Sequence[Judgment]) -> QualityReport:
    ds = dawid_skene(
        [Rating(j.comparison.id, j.rater.id, j.choice) for j in judgments], classes=("a", "b")
    )
    records = [
        JudgmentRecord(
            rater_id=j.rater.id,
            choice=j.choice,
            left_was_a=j.left_was_a,
            a_longer=j.comparison.a_longer,
            decision_ms=j.decision_ms,
            gold_correct=(j.choice == j.comparison.truth) if j.comparison.gold else None,
        )
        for j in judgments
    ]
    stats = rater_stats(records)
    by_rater: dict[str, list[Judgment]] = {}
    for j in judgments:
        by_rater.setdefault(j.rater.id, []).append(j)
    rows = []
    order = (*HONEST, *JUNK)
    for rater_id, js in sorted(
        by_rater.items(), key=lambda kv: (order.index(kv[1][0].rater.kind), kv[0])
    ):
        rater = js[0].rater
        weight = judgment_weight(ds, rater_id)
        s = stats[rater_id]
        rows.append(
            {
                "rater": rater_id,
                "kind": rater.kind,
                "accuracy": rater.accuracy,
                "realised": sum(j.choice == j.comparison.truth for j in js) / len(js),
                "n": len(js),
                "reliability": ds.reliability[rater_id],
                "weight": weight,
                "left_rate": s.left_rate,
                "longer_rate": s.longer_rate,
                "median_s": (s.median_decision_ms or 0) / 1000,
                "gold_n": s.gold_n,
                "gold_accuracy": s.gold_accuracy,
                "flags": rater_flags(s, ds_weight=weight),
            }
        )
    column = {k: [r[k] for r in rows] for k in ("accuracy", "realised", "reliability", "weight")}
    return QualityReport(
        spearman_reliability=spearman(column["accuracy"], column["reliability"]),
        spearman_weight=spearman(column["accuracy"], column["weight"]),
        spearman_realised=spearman(column["realised"], column["reliability"]),
        rows=rows,
    )


def short_flag(flag: str) -> str:
    """The kind of a flag, for a narrow table cell."""
    for key, name in (
        ("left side", "left"),
        ("right side", "right"),
        ("longer output", "longer"),
        ("shorter output", "shorter"),
        ("gold accuracy", "gold"),
        ("decision time", "fast"),
        ("tie or both-bad", "ties"),
        ("Dawid-Skene", "DS weight"),
    ):
        if key in flag:
            return name
    return flag


def rater_table(report: QualityReport) -> str:
    return table(
        [
            "rater",
            "true kind",
            "accuracy (design)",
            "accuracy (realised)",
            "judgments",
            "DS reliability",
            "DS weight",
            "left rate",
            "longer rate",
            "median s",
            "gold acc (n)",
            "flags",
        ],
        [
            [
                r["rater"],
                r["kind"],
                r["accuracy"],
                r["realised"],
                r["n"],
                r["reliability"],
                r["weight"],
                r["left_rate"],
                r["longer_rate"],
                r["median_s"],
                f"{r['gold_accuracy']:.2f} ({r['gold_n']})" if r["gold_n"] else "-",
                ", ".join(short_flag(f) for f in r["flags"]) or "none",
            ]
            for r in report.rows
        ],
    )


def quality_seed(
    seed: int, mix: Sequence[int], *, items: int, overlap: int, gold_fraction: float
) -> tuple[list[Comparison], list[Judgment], QualityReport]:
    rng = random.Random(seed)
    train = comparisons(items, rng, gold_fraction=gold_fraction)
    judgments = simulate(train, rater_pool(mix), overlap, rng)
    return train, judgments, quality_report(judgments)


def quality_summary(reports: Sequence[QualityReport]) -> dict[str, Any]:
    """Spearman over seeds, and per rater: mean estimates and how often each flag fired."""
    rho = [r.spearman_reliability for r in reports]
    realised = [r.spearman_realised for r in reports]
    raters: dict[str, dict[str, Any]] = {}
    for report in reports:
        for row in report.rows:
            entry = raters.setdefault(
                row["rater"],
                {
                    "kind": row["kind"],
                    "accuracy": row["accuracy"],
                    "rows": [],
                    "reasons": Counter(),
                },
            )
            entry["rows"].append(row)
            entry["reasons"].update(short_flag(f) for f in row["flags"])
    per_rater = {
        rater: {
            "kind": e["kind"],
            "accuracy": e["accuracy"],
            "realised": statistics.mean(r["realised"] for r in e["rows"]),
            "reliability": statistics.mean(r["reliability"] for r in e["rows"]),
            "weight": statistics.mean(r["weight"] for r in e["rows"]),
            "flagged": sum(bool(r["flags"]) for r in e["rows"]),
            "seeds": len(e["rows"]),
            "reasons": dict(e["reasons"]),
        }
        for rater, e in raters.items()
    }
    by_kind = {
        kind: (
            sum(v["flagged"] for v in per_rater.values() if v["kind"] == kind),
            sum(v["seeds"] for v in per_rater.values() if v["kind"] == kind),
        )
        for kind in (*HONEST, *JUNK)
        if any(v["kind"] == kind for v in per_rater.values())
    }
    return {
        "seeds": len(reports),
        "spearman_mean": statistics.mean(rho),
        "spearman_min": min(rho),
        "spearman_at_least_0.9": sum(x >= 0.9 for x in rho),
        "spearman_realised_mean": statistics.mean(realised),
        "spearman_realised_min": min(realised),
        "flagged_by_kind": by_kind,
        "raters": per_rater,
    }


def summary_tables(summary: dict[str, Any]) -> list[str]:
    n = summary["seeds"]
    figures = table(
        ["figure", f"over {n} seeds"],
        [
            [
                "Spearman(design accuracy, DS reliability): mean, lowest",
                f"{summary['spearman_mean']:.3f}, {summary['spearman_min']:.3f}",
            ],
            ["seeds with Spearman >= 0.9", f"{summary['spearman_at_least_0.9']} / {n}"],
            [
                "Spearman(realised accuracy, DS reliability): mean, lowest",
                f"{summary['spearman_realised_mean']:.3f}, {summary['spearman_realised_min']:.3f}",
            ],
        ]
        + [
            [f"{kind} raters flagged", f"{hit} / {total}"]
            for kind, (hit, total) in summary["flagged_by_kind"].items()
        ],
    )
    raters = table(
        [
            "rater",
            "true kind",
            "accuracy (design)",
            "accuracy (realised)",
            "DS reliability",
            "DS weight",
            "flagged",
            "flags (seeds)",
        ],
        [
            [
                rater,
                v["kind"],
                v["accuracy"],
                v["realised"],
                v["reliability"],
                v["weight"],
                f"{v['flagged']} / {v['seeds']}",
                ", ".join(f"{k} {c}" for k, c in sorted(v["reasons"].items())) or "-",
            ]
            for rater, v in summary["raters"].items()
        ],
    )
    return [figures, "", "Per rater (means over the seeds):", "", raters]


def sweep_table(mix: Sequence[int], items: Sequence[int], seeds: int, **sizes: Any) -> str:
    """How the figures of (a) and (b) move with the number of labels per rater."""
    rows = []
    for n in items:
        reports = [quality_seed(s, mix, items=n, **sizes)[2] for s in range(seeds)]
        summary = quality_summary(reports)
        flagged = summary["flagged_by_kind"]
        junk = [flagged[k] for k in JUNK if k in flagged]
        rows.append(
            [
                n,
                n * sizes["overlap"] / sum(mix),
                summary["spearman_mean"],
                summary["spearman_min"],
                f"{summary['spearman_at_least_0.9']} / {seeds}",
                "{} / {}".format(*flagged.get("careful", (0, 0))),
                "{} / {}".format(*flagged.get("noisy", (0, 0))),
                f"{sum(h for h, _ in junk)} / {sum(t for _, t in junk)}",
            ]
        )
    return table(
        [
            "comparisons",
            "labels per rater",
            "Spearman mean",
            "lowest",
            "seeds >= 0.9",
            "careful flagged",
            "noisy flagged",
            "junk flagged",
        ],
        rows,
    )


# ---- (c): weighted vs unweighted reward-model training ---------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    hidden: int = 64
    layers: int = 2
    learning_rate: float = 3e-3
    batch_size: int = 16
    epochs: int = 1
    max_length: int = 48
    gold_pairs: int = 600


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def train_arms(
    seed: int,
    judgments: Sequence[Judgment],
    weights: dict[str, float],
    settings: TrainSettings,
    folder: Path,
    *,
    with_truth: bool = True,
) -> dict[str, dict[str, float]]:
    """Gold accuracy of reward models trained on ``judgments``: weighted, unweighted, and
    (``with_truth``) on the true labels of the same comparisons, a ceiling. Same model init,
    same batches, same steps in every arm."""
    from training.core.data import PreferencePair, read_preference_jsonl
    from training.core.modeling import (
        build_tiny_causal_lm,
        load_reward_model,
        load_tokenizer,
        set_seed,
    )
    from training.core.reward import RewardConfig, train_reward_model

    model_dir = build_tiny_causal_lm(
        folder / "base", hidden=settings.hidden, layers=settings.layers, seed=seed
    )
    tokenizer = load_tokenizer(model_dir)
    # The annotation app's full export, one line per judgment, with the rater's weight.
    data = write_jsonl(
        folder / "judgments.jsonl",
        [
            {
                "prompt": j.comparison.prompt,
                "completion_a": j.comparison.a,
                "completion_b": j.comparison.b,
                "choice": j.choice,
                "weight": weights[j.rater.id],
            }
            for j in judgments
        ],
    )
    truth = write_jsonl(
        folder / "truth.jsonl",
        [
            {
                "prompt": j.comparison.prompt,
                "completion_a": j.comparison.a,
                "completion_b": j.comparison.b,
                "choice": j.comparison.truth,
            }
            for j in judgments
        ],
    )
    gold_rng = random.Random(10_000 + seed)
    gold = [
        PreferencePair(
            [{"role": "user", "content": c.prompt}],
            c.a if c.truth == "a" else c.b,
            c.b if c.truth == "a" else c.a,
        )
        for c in comparisons(settings.gold_pairs, gold_rng)
    ]
    arms = {"weighted": (data, True), "unweighted": (data, False)}
    if with_truth:
        arms["true labels"] = (truth, True)
    out = {}
    for name, (path, use_weights) in arms.items():
        config = RewardConfig(
            model=str(model_dir),
            output_dir=str(folder / name.replace(" ", "-")),
            device="cpu",
            seed=seed,
            learning_rate=settings.learning_rate,
            batch_size=settings.batch_size,
            max_steps=-1,
            num_epochs=settings.epochs,
            max_length=settings.max_length,
            max_prompt_length=24,
            use_weights=use_weights,
            normalize=False,
            resume=False,
        )
        set_seed(seed)  # the fresh reward head is drawn from the global RNG
        model = load_reward_model(model_dir, device="cpu")
        t0 = time.perf_counter()
        result = train_reward_model(
            config, read_preference_jsonl(path), model, tokenizer, eval_pairs=gold
        )
        out[name] = {
            "gold_accuracy": result.metrics["eval_accuracy"],
            "gold_nll": result.metrics["eval_nll"],
            "steps": result.metrics["steps"],
            "seconds": time.perf_counter() - t0,
        }
    return out


def mean_sd(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "-"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


# ---- main -----------------------------------------------------------------------------------------


def parse_mix(text: str) -> tuple[int, ...]:
    mix = tuple(int(x) for x in text.split(":"))
    if len(mix) != 5 or min(mix) < 0 or sum(mix) < 2:
        raise argparse.ArgumentTypeError(
            "a mix is careful:noisy:left:spammer:longer, e.g. 3:3:2:2:1"
        )
    return mix


def junk_share(mix: Sequence[int]) -> float:
    return sum(mix[2:]) / sum(mix)


def training_table(training: Sequence[dict[str, Any]], mixes: Sequence[Sequence[int]]) -> str:
    rows = []
    for mix in mixes:
        runs = [t for t in training if tuple(t["mix"]) == tuple(mix)]
        acc = {
            arm: [t["arms"][arm]["gold_accuracy"] for t in runs]
            for arm in ("weighted", "unweighted", "true labels")
        }
        diff = [w - u for w, u in zip(acc["weighted"], acc["unweighted"], strict=True)]
        weights = "/".join(
            f"{statistics.mean(t['weights'][g] for t in runs):.2f}"
            for g in ("careful", "noisy", "junk")
        )
        rows.append(
            [
                ":".join(map(str, mix)),
                f"{junk_share(mix):.0%}",
                weights,
                len(runs),
                mean_sd(acc["weighted"]),
                mean_sd(acc["unweighted"]),
                mean_sd(diff),
                f"{sum(d > 0 for d in diff)} / {len(diff)}",
                mean_sd(acc["true labels"]),
            ]
        )
    return table(
        [
            "mix c:n:l:s:len",
            "junk raters",
            "mean DS weight careful/noisy/junk",
            "seeds",
            "weighted",
            "unweighted",
            "weighted - unweighted",
            "seeds weighted wins",
            "true labels (ceiling)",
        ],
        rows,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a < 1 minute smoke run")
    parser.add_argument("--items", type=int, default=600, help="comparisons rated per seed")
    parser.add_argument("--overlap", type=int, default=3, help="raters per comparison")
    parser.add_argument("--gold-fraction", type=float, default=0.1)
    parser.add_argument(
        "--mix", type=parse_mix, default=(3, 3, 2, 2, 1), help="careful:noisy:left:spammer:longer"
    )
    parser.add_argument("--quality-seeds", type=int, default=20, help="seeds for (a) and (b)")
    parser.add_argument(
        "--sweep-items",
        type=int,
        nargs="*",
        default=[300, 600, 1200, 2400],
        help="comparison counts for the labels-per-rater sweep of (a) and (b); none: skip",
    )
    parser.add_argument("--train-seeds", type=int, default=5, help="seeds for (c)")
    parser.add_argument(
        "--train-mixes",
        type=parse_mix,
        nargs="*",
        default=[(3, 3, 1, 1, 0), (3, 3, 2, 2, 1), (3, 3, 4, 4, 2)],
        help="rater mixes for (c); the main --mix when given without values",
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--no-train", action="store_true", help="skip (c)")
    args = parser.parse_args()
    if args.quick:
        args.items, args.quality_seeds, args.train_seeds = 300, 3, 1
        args.train_mixes, args.sweep_items = [args.mix], []
    train_mixes = args.train_mixes or [args.mix]
    settings = TrainSettings(
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        gold_pairs=200 if args.quick else TrainSettings.gold_pairs,
    )
    info = machine()
    started = time.perf_counter()
    sizes = {"overlap": args.overlap, "gold_fraction": args.gold_fraction}

    # (a) + (b)
    reports = [
        quality_seed(seed, args.mix, items=args.items, **sizes)[2]
        for seed in range(args.quality_seeds)
    ]
    summary = quality_summary(reports)
    sweep = sweep_table(args.mix, args.sweep_items, args.quality_seeds, **sizes)
    log(f"(a)+(b) done in {time.perf_counter() - started:.1f}s")

    # (c)
    training: list[dict[str, Any]] = []
    if not args.no_train:
        import torch
        import transformers

        torch.set_num_threads(1)
        # The fresh reward head is announced in a long load report per model: expected here.
        transformers.logging.set_verbosity_error()
        ceiling: dict[int, dict[str, float]] = {}
        for mix in train_mixes:
            for seed in range(args.train_seeds):
                _, judgments, report = quality_seed(seed, mix, items=args.items, **sizes)
                weights = {r["rater"]: r["weight"] for r in report.rows}
                with tempfile.TemporaryDirectory(prefix="quality-sim-") as tmp:
                    # A seed's comparisons, model init and batches do not depend on the mix,
                    # so its true-label ceiling is trained once.
                    arms = train_arms(
                        seed,
                        judgments,
                        weights,
                        settings,
                        Path(tmp),
                        with_truth=seed not in ceiling,
                    )
                ceiling.setdefault(seed, arms.get("true labels", {}))
                arms["true labels"] = ceiling[seed]
                by_kind = {
                    group: statistics.mean(
                        r["weight"] for r in report.rows if (r["kind"] in kinds) == inside
                    )
                    for group, kinds, inside in (
                        ("careful", ("careful",), True),
                        ("noisy", ("noisy",), True),
                        ("junk", HONEST, False),
                    )
                }
                training.append({"mix": mix, "seed": seed, "arms": arms, "weights": by_kind})
                log(
                    f"(c) mix {':'.join(map(str, mix))} seed {seed}: "
                    + ", ".join(f"{k} {v['gold_accuracy']:.3f}" for k, v in arms.items())
                )
    elapsed = time.perf_counter() - started

    lines = [
        "# Simulated raters: Dawid-Skene, flags and weighted reward-model training",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Machine: {machine_line(info)}; {elapsed:.0f} s wall.",
        "",
        f"{args.items} comparisons per seed, {args.overlap} raters each, "
        f"{args.gold_fraction:.0%} gold; rater mix careful:noisy:left:spammer:longer = "
        f"{':'.join(map(str, args.mix))} ({junk_share(args.mix):.0%} of the raters are junk).",
        "",
        "## (a) + (b) Seed 0: reliability, weight and flags per rater",
        "",
        rater_table(reports[0]),
        "",
        f"Spearman(design accuracy, DS reliability) = {reports[0].spearman_reliability:.3f}; "
        f"(design accuracy, DS weight) = {reports[0].spearman_weight:.3f}; "
        f"(realised accuracy, DS reliability) = {reports[0].spearman_realised:.3f}.",
        "",
        f"## (a) + (b) Over {summary['seeds']} seeds",
        "",
        *summary_tables(summary),
    ]
    if args.sweep_items:
        lines += [
            "",
            f"## (a) + (b) Labels per rater ({args.quality_seeds} seeds per row)",
            "",
            sweep,
        ]
    if training:
        lines += [
            "",
            "## (c) Reward-model gold accuracy: reliability-weighted vs unweighted",
            "",
            f"Tiny Llama reward model (hidden {settings.hidden}, {settings.layers} layers, random "
            f"init), {settings.epochs} epoch over the {args.items * args.overlap} judgments at "
            f"batch {settings.batch_size}, learning rate {settings.learning_rate}; gold accuracy "
            f"on {settings.gold_pairs} held-out pairs labelled by the true reward; mean ± sd "
            f"over seeds 0..{args.train_seeds - 1}.",
            "",
            training_table(training, train_mixes),
            "",
            "Per seed (gold accuracy):",
            "",
            table(
                ["mix", "seed", "weighted", "unweighted", "weighted - unweighted", "true labels"],
                [
                    [
                        ":".join(map(str, t["mix"])),
                        t["seed"],
                        t["arms"]["weighted"]["gold_accuracy"],
                        t["arms"]["unweighted"]["gold_accuracy"],
                        f"{t['arms']['weighted']['gold_accuracy'] - t['arms']['unweighted']['gold_accuracy']:+.3f}",
                        t["arms"]["true labels"]["gold_accuracy"],
                    ]
                    for t in training
                ],
            ),
        ]
    print("\n".join(lines))
    path = save_results(
        "quality_sim",
        {
            "command": command_line(),
            "machine": info,
            "seconds": elapsed,
            "args": vars(args),
            "settings": asdict(settings),
            "quality": [asdict(r) for r in reports],
            "quality_summary": summary,
            "sweep": sweep,
            "training": training,
        },
    )
    log(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
