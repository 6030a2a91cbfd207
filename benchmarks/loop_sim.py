"""Does the loop work? Simulated raters, a hidden gold reward, and the project's own trainers.

A synthetic task with a hidden gold reward (``benchmarks/_loop_common.py``: the share of an
answer's words that come from a small "good" set) and simulated raters who answer with
Bradley-Terry noise on it. Two questions:

1. **The loop.** Each round samples two answers per fresh prompt from the current policy, the
   raters label the pairs, the reward model (an ensemble of heads) is retrained on every label
   so far, and the policy is trained from where it stands with the initial policy as the
   reference: DPO on the labels (default) or PPO against the reward model with a KL penalty.
   After each round, fresh samples on held-out prompts give the policy's mean gold reward and
   KL(policy || initial policy). Claim: the gold reward rises over the rounds while the KL
   stays below a stated bound (``--kl-bound``, nats per answer).
2. **Label efficiency.** A fixed pool of candidate pairs from the initial policy, a small random
   seed set of labels, then acquisition steps of ``--batch`` labels chosen at random or by the
   reward-model ensemble's disagreement (std over heads of sigmoid(r_a - r_b)); after each step
   the reward model is retrained and its accuracy measured on held-out pairs labelled by the
   gold reward. Claim: uncertain pairs reach the target accuracy with fewer labels; the ratio
   random / uncertain is printed per seed and on average.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loop_sim.py            # <= 10 min, 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loop_sim.py --quick    # ~1-2 min
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from benchmarks._loop_common import (
    Candidate,
    all_pairs,
    ModelSettings,
    RaterPool,
    RewardSettings,
    candidates,
    disagreement,
    gold_pairs,
    gold_reward,
    initial_policy,
    pair_scores,
    prompts,
    quiet,
    reward_accuracy,
    sample,
    sampled_kl,
    train_reward,
)
from benchmarks._training_common import (
    command_line,
    log,
    machine,
    machine_line,
    save_results,
    table,
)
from training.core.data import Messages, PreferencePair, PromptItem
from training.core.dpo import DPOConfig, train_dpo
from training.core.modeling import load_causal_lm, load_reward_model, load_tokenizer
from training.core.ppo import PPOConfig, PPOModels, train_ppo
from training.core.reward import reward_from_logits, score_completions
from training.core.rewards import RewardModelSource

# ---- part 1: the loop ------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopSettings:
    rounds: int = 5
    prompts_per_round: int = 64
    eval_prompts: int = 64
    eval_samples: int = 4
    algorithm: str = "dpo"
    dpo_beta: float = 0.5
    dpo_learning_rate: float = 1e-3
    dpo_epochs: int = 2
    dpo_steps: int = 0  # fixed steps per round; 0: dpo_epochs over the labels
    ppo_learning_rate: float = 1e-3
    ppo_steps: int = 20
    ppo_kl_coef: float = 0.1
    policy_batch_size: int = 16
    min_steps: int = 20


@dataclass
class Evaluation:
    gold: float
    gold_se: float
    kl_k1: float
    kl_k3: float
    length: float
    pairs: list[PreferencePair] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


def evaluate_policy(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    items: list[Messages],
    *,
    samples: int,
    settings: ModelSettings,
    seed: int,
) -> Evaluation:
    """Fresh samples on held-out prompts: mean gold reward, KL to the reference, and the
    gold-labelled pairs of those samples (the reward model's held-out set)."""
    out = sample(policy, tokenizer, items, n=samples, settings=settings, seed=seed)
    golds = [gold_reward(t) for t in out.texts]
    kl = sampled_kl(out, reference)
    return Evaluation(
        gold=statistics.mean(golds),
        gold_se=statistics.stdev(golds) / math.sqrt(len(golds)),
        kl_k1=kl["kl_k1"],
        kl_k3=kl["kl_k3"],
        length=statistics.mean(len(t.split()) for t in out.texts),
        pairs=gold_pairs(candidates(items, out.texts, samples)),
        texts=out.texts,
    )


def proxy_score(
    rm: nn.Module, tokenizer: Any, items: list[Messages], texts: list[str], samples: int,
    settings: ModelSettings,
) -> float:
    """Mean normalised reward-model score of the samples (the proxy the policy may exploit)."""
    repeated = [item for item in items for _ in range(samples)]
    logits = score_completions(
        rm,
        tokenizer,
        repeated,
        texts,
        max_length=settings.max_length,
        max_prompt_length=settings.max_prompt_length,
    )
    return float(reward_from_logits(logits, rm.config).mean())


def policy_steps(count: int, epochs: int, batch: int, minimum: int) -> int:
    return max(minimum, math.ceil(epochs * count / batch))


def dpo_round(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    labels: list[PreferencePair],
    out: Path,
    loop: LoopSettings,
    settings: ModelSettings,
    seed: int,
) -> dict[str, float]:
    """DPO from the current policy on every label so far, reference = the initial policy."""
    config = DPOConfig(
        output_dir=str(out),
        device="cpu",
        seed=seed,
        beta=loop.dpo_beta,
        learning_rate=loop.dpo_learning_rate,
        batch_size=loop.policy_batch_size,
        max_steps=loop.dpo_steps
        or policy_steps(len(labels), loop.dpo_epochs, loop.policy_batch_size, loop.min_steps),
        max_length=settings.max_length,
        max_prompt_length=settings.max_prompt_length,
        kl_samples=0,  # KL is measured by the benchmark on its own held-out samples
        resume=False,
    )
    with quiet():
        return train_dpo(config, labels, policy, reference, tokenizer)


def ppo_round(
    policy: nn.Module,
    reference: nn.Module,
    rm: nn.Module,
    rm_dir: Path,
    tokenizer: Any,
    items: list[Messages],
    out: Path,
    loop: LoopSettings,
    settings: ModelSettings,
    seed: int,
) -> dict[str, float]:
    """PPO from the current policy against the round's reward model, KL penalty to the
    initial policy; the critic starts from the reward model (checklist item 11)."""
    config = PPOConfig(
        output_dir=str(out),
        device="cpu",
        seed=seed,
        learning_rate=loop.ppo_learning_rate,
        batch_size=loop.policy_batch_size,
        max_steps=loop.ppo_steps,
        max_new_tokens=settings.max_new_tokens,
        max_length=settings.max_length,
        max_prompt_length=settings.max_prompt_length,
        kl_coef=loop.ppo_kl_coef,
        resume=False,
    )
    value_model = load_reward_model(rm_dir, num_labels=1)
    source = RewardModelSource(
        rm,
        tokenizer,
        max_length=settings.max_length,
        max_prompt_length=settings.max_prompt_length,
    )
    models = PPOModels(policy, reference, value_model, tokenizer, source)
    with quiet():
        result = train_ppo(config, [PromptItem(p) for p in items], models=models)
    return result.metrics


def run_loop(
    policy_dir: Path, work: Path, loop: LoopSettings, reward: RewardSettings,
    settings: ModelSettings, *, raters: int, beta: float, seed: int,
) -> list[dict[str, Any]]:
    tokenizer = load_tokenizer(policy_dir)
    reference = load_causal_lm(policy_dir).requires_grad_(False)
    policy = load_causal_lm(policy_dir)
    pool = RaterPool(raters, beta, seed)
    eval_items = prompts(1_000_000, loop.eval_prompts)

    def evaluate(round_number: int) -> Evaluation:
        return evaluate_policy(
            policy, reference, tokenizer, eval_items, samples=loop.eval_samples,
            settings=settings, seed=seed * 1_000 + 500 + round_number,
        )

    previous = evaluate(0)
    rows: list[dict[str, Any]] = [
        {
            "round": 0, "labels": 0, "rater_agreement": math.nan, "rm_accuracy": math.nan,
            "rm_accuracy_new": math.nan, "proxy": math.nan, "gold": previous.gold,
            "gold_se": previous.gold_se, "kl_k1": previous.kl_k1, "kl_k3": previous.kl_k3,
            "length": previous.length, "seconds": 0.0,
        }
    ]
    log(f"loop round 0: gold {previous.gold:.3f}")
    labels: list[PreferencePair] = []
    for r in range(1, loop.rounds + 1):
        t0 = time.perf_counter()
        items = prompts(r * 10_000, loop.prompts_per_round)
        out = sample(policy, tokenizer, items, n=2, settings=settings, seed=seed * 1_000 + r)
        new = [pool.label(c.prompt, c.a, c.b) for c in candidates(items, out.texts, 2)]
        strict = [p for p in new if gold_reward(p.chosen) != gold_reward(p.rejected)]
        agreement = sum(gold_reward(p.chosen) > gold_reward(p.rejected) for p in strict) / max(
            len(strict), 1
        )
        labels += new
        rm_dir = work / f"round{r}" / "reward"
        rm = train_reward(
            labels, policy_dir, rm_dir, settings=reward, model_settings=settings, seed=seed + r
        )
        rm_accuracy = reward_accuracy(rm, tokenizer, previous.pairs, settings)
        if loop.algorithm == "dpo":
            dpo_round(policy, reference, tokenizer, labels, work / f"round{r}" / "dpo", loop,
                      settings, seed + r)
        else:
            ppo_round(policy, reference, rm, rm_dir, tokenizer, items, work / f"round{r}" / "ppo",
                      loop, settings, seed + r)
        policy.eval()
        policy.save_pretrained(work / f"round{r}" / "policy")
        tokenizer.save_pretrained(work / f"round{r}" / "policy")
        current = evaluate(r)
        rows.append(
            {
                "round": r,
                "labels": len(labels),
                "rater_agreement": agreement,
                "rm_accuracy": rm_accuracy,
                "rm_accuracy_new": reward_accuracy(rm, tokenizer, current.pairs, settings),
                "proxy": proxy_score(rm, tokenizer, eval_items, current.texts,
                                     loop.eval_samples, settings),
                "gold": current.gold,
                "gold_se": current.gold_se,
                "kl_k1": current.kl_k1,
                "kl_k3": current.kl_k3,
                "length": current.length,
                "seconds": time.perf_counter() - t0,
            }
        )
        log(
            f"loop round {r}: labels {len(labels)}, RM acc {rm_accuracy:.3f}, gold "
            f"{current.gold:.3f}, KL k3 {current.kl_k3:.3f} ({rows[-1]['seconds']:.1f}s)"
        )
        previous = current
    return rows


# ---- part 2: label efficiency ------------------------------------------------------------------


@dataclass(frozen=True)
class ActiveSettings:
    seeds: int = 3
    pool_prompts: int = 1000
    pool_samples: int = 2
    eval_prompts: int = 300
    seed_labels: int = 32
    batch: int = 32
    budget: int = 320
    targets: tuple[float, ...] = (0.75, 0.8)


def labels_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """Labels at the first acquisition step whose accuracy is at least ``target``."""
    return next((n for n, acc in curve if acc >= target), None)


def mixed_samples(
    sources: list[Path], tokenizer: Any, items: list[Messages], per_source: int,
    settings: ModelSettings, seed: int,
) -> list[str]:
    """``per_source`` answers per prompt from each policy, grouped by prompt."""
    texts: list[list[str]] = [[] for _ in items]
    for k, source in enumerate(sources):
        policy = load_causal_lm(source)
        out = sample(policy, tokenizer, items, n=per_source, settings=settings, seed=seed + k)
        for i in range(len(items)):
            texts[i] += out.texts[i * per_source : (i + 1) * per_source]
    return [t for row in texts for t in row]


def answer_heads(
    rm: nn.Module, tokenizer: Any, items: list[Messages], texts: list[str], n: int,
    settings: ModelSettings,
) -> torch.Tensor:
    """Raw head outputs (P, n, K) of every answer, scored once (as the platform scores each
    completion once and forms pair disagreements from the heads)."""
    repeated = [item for item in items for _ in range(n)]
    logits = score_completions(
        rm, tokenizer, repeated, texts, max_length=settings.max_length,
        max_prompt_length=settings.max_prompt_length, batch_size=64,
    )  # (P * n, K)
    return logits.view(len(items), n, -1)


def active_seed(
    policy_dir: Path, sources: list[Path], work: Path, active: ActiveSettings,
    reward: RewardSettings, settings: ModelSettings, *, raters: int, beta: float, seed: int,
) -> dict[str, Any]:
    tokenizer = load_tokenizer(policy_dir)
    n = active.pool_samples * len(sources)
    pairs_of = [(j, k) for j in range(n) for k in range(j + 1, n)]
    pool_items = prompts(2_000_000 + seed * 100_000, active.pool_prompts)
    texts = mixed_samples(sources, tokenizer, pool_items, active.pool_samples, settings, 7_000 + 10 * seed)
    # Rater answers drawn once per (prompt, pair): both arms see the same answer for a pair.
    rater_pool = RaterPool(raters, beta, 10_000 + seed)
    answers = {
        (p, j, k): rater_pool.label(pool_items[p], texts[p * n + j], texts[p * n + k])
        for p in range(len(pool_items)) for j, k in pairs_of
    }
    eval_items = prompts(3_000_000 + seed * 100_000, active.eval_prompts)
    held = mixed_samples(sources, tokenizer, eval_items, active.pool_samples, settings, 8_000 + 10 * seed)
    eval_pairs = gold_pairs(all_pairs(eval_items, held, n))
    usable = [
        (p, j, k) for p in range(len(pool_items)) for j, k in pairs_of
        if texts[p * n + j] != texts[p * n + k]
    ]
    rng = random.Random(seed)
    seed_set = rng.sample(usable, active.seed_labels)
    arms: dict[str, list[tuple[int, float]]] = {}
    for arm in ("random", "uncertain"):
        pick_rng = random.Random(seed + 1)
        labelled = list(seed_set)
        curve: list[tuple[int, float]] = []
        while True:
            rm = train_reward(
                [answers[key] for key in labelled], policy_dir, work / f"active{seed}-{arm}",
                settings=reward, model_settings=settings, seed=seed, normalize=False,
            )
            curve.append((len(labelled), reward_accuracy(rm, tokenizer, eval_pairs, settings)))
            if len(labelled) >= active.budget:
                break
            # One labelled pair per prompt, as the platform builds one comparison per prompt
            # (``pairs_per_prompt`` 1): the arms differ only in which pair and which prompts.
            used = {key[0] for key in labelled}
            open_prompts = [p for p in range(len(pool_items)) if p not in used]
            options = {
                p: [(j, k) for j, k in pairs_of if (p, j, k) in answers and texts[p * n + j] != texts[p * n + k]]
                for p in open_prompts
            }
            options = {p: v for p, v in options.items() if v}
            if arm == "random":
                chosen = pick_rng.sample(sorted(options), active.batch)
                labelled += [(p, *pick_rng.choice(options[p])) for p in chosen]
            else:
                heads = answer_heads(rm, tokenizer, pool_items, texts, n, settings)  # (P, n, K)
                best = []
                for p, pairs in options.items():
                    spread = disagreement(
                        torch.stack([heads[p, j] - heads[p, k] for j, k in pairs])
                    )  # (pairs,)
                    i = int(torch.argmax(spread))
                    best.append((float(spread[i]), p, *pairs[i]))
                best.sort(key=lambda row: (-row[0], row[1]))
                labelled += [(p, j, k) for _, p, j, k in best[: active.batch]]
        arms[arm] = curve
        log(f"active seed {seed} {arm}: " + ", ".join(f"{m}:{a:.3f}" for m, a in curve))
    strict = [a for a in answers.values() if gold_reward(a.chosen) != gold_reward(a.rejected)]
    return {
        "seed": seed,
        "pool_prompts": len(pool_items),
        "pool_pairs": len(usable),
        "eval_pairs": len(eval_pairs),
        "rater_agreement": sum(gold_reward(a.chosen) > gold_reward(a.rejected) for a in strict)
        / max(len(strict), 1),
        "curves": arms,
    }


# ---- output ------------------------------------------------------------------------------------


def loop_table(rows: list[dict[str, Any]]) -> str:
    return table(
        [
            "round", "labels", "rater agreement with gold", "RM acc (pairs of policy it trained on)",
            "RM acc (pairs of new policy)", "RM score (new policy)", "gold reward (± s.e.)",
            "KL k3 (nats)", "KL k1 (nats)", "words", "seconds",
        ],
        [
            [
                r["round"], r["labels"], r["rater_agreement"], r["rm_accuracy"],
                r["rm_accuracy_new"], r["proxy"], f"{r['gold']:.3f} ± {r['gold_se']:.3f}",
                r["kl_k3"], r["kl_k1"], r["length"], r["seconds"],
            ]
            for r in rows
        ],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~1-2 minute smoke run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task and the loop")
    parser.add_argument("--rounds", type=int, default=LoopSettings.rounds)
    parser.add_argument("--algorithm", choices=("dpo", "ppo"), default="dpo")
    parser.add_argument("--beta", type=float, default=10.0, help="raters' Bradley-Terry beta")
    parser.add_argument("--raters", type=int, default=5)
    parser.add_argument("--kl-bound", type=float, default=10.0, help="nats per answer")
    parser.add_argument("--seeds", type=int, default=ActiveSettings.seeds, help="part 2 seeds")
    parser.add_argument("--budget", type=int, default=ActiveSettings.budget)
    parser.add_argument("--batch", type=int, default=ActiveSettings.batch)
    parser.add_argument("--dpo-beta", type=float, default=LoopSettings.dpo_beta)
    parser.add_argument("--dpo-lr", type=float, default=LoopSettings.dpo_learning_rate)
    parser.add_argument("--dpo-steps", type=int, default=LoopSettings.dpo_steps)
    parser.add_argument("--ppo-kl", type=float, default=LoopSettings.ppo_kl_coef)
    parser.add_argument("--ppo-steps", type=int, default=LoopSettings.ppo_steps)
    parser.add_argument("--ppo-lr", type=float, default=LoopSettings.ppo_learning_rate)
    parser.add_argument("--skip-loop", action="store_true")
    parser.add_argument("--skip-active", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    settings = ModelSettings()
    reward = RewardSettings()
    loop = LoopSettings(
        rounds=args.rounds, algorithm=args.algorithm, dpo_beta=args.dpo_beta,
        dpo_learning_rate=args.dpo_lr, dpo_steps=args.dpo_steps, ppo_kl_coef=args.ppo_kl,
        ppo_steps=args.ppo_steps, ppo_learning_rate=args.ppo_lr,
    )
    active = ActiveSettings(seeds=args.seeds, budget=args.budget, batch=args.batch)
    info = machine()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loop-sim-") as tmp:
        work = Path(tmp)
        policy_dir = initial_policy(work / "initial", settings, args.seed)
        log(f"initial policy in {time.perf_counter() - started:.1f}s")
        rows = [] if args.skip_loop else run_loop(
            policy_dir, work / "loop", loop, reward, settings, raters=args.raters,
            beta=args.beta, seed=args.seed,
        )
        results = [] if args.skip_active else [
            active_seed(policy_dir, work / "active", active, reward, settings,
                        raters=args.raters, beta=args.beta, seed=s)
            for s in range(active.seeds)
        ]
    elapsed = time.perf_counter() - started
    print(f"Command: `{command_line()}`\n")
    print(f"Machine: {machine_line(info)}; {elapsed:.0f} s wall.\n")
    if rows:
        print(loop_table(rows))
    for res in results:
        print(res["seed"], res["curves"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
