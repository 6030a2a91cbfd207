"""One timed training run in a process of its own, for ``training_speed.py`` (not for people).

``training_speed.py`` starts this file once per (algorithm, implementation) with the Python of
the right virtual environment, so that peak RSS is per run and TRL 1.12 (the last with PPO)
runs from its own venv. It must therefore import nothing from the project when ``--impl trl``:
the TRL venv does not have it. What it measures:

* per optimiser step ("step" = one batch of pairs, or one rollout batch for the RL trainers):
  the CPU time of this process (``time.process_time``, user + system of all its threads) and
  the wall time between the ends of consecutive steps; the first ``--warmup`` steps are left
  out of the medians (lazy initialisation, allocator warm-up);
* tokens per step: non-pad tokens of the step's training batch (pairs: prompt + answer of both
  sides) or of its rollout (prompt + sampled completion);
* ``setup_cpu_s``: CPU from just before the trainer is built (model load, data tokenisation,
  DPO's reference pass, ...) to the end of the last step, so one-off work that the per-step
  median does not see is still on the table;
* peak RSS of the process (``ru_maxrss``), imports included.

Results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

T_START_CPU = time.process_time()
T_START_WALL = time.perf_counter()


class Recorder:
    def __init__(self) -> None:
        self.begin_cpu = self.begin_wall = 0.0
        self.marks: list[tuple[float, float, float]] = []  # (cpu, wall, tokens so far)
        self.tokens = 0.0
        self.logs: list[dict[str, Any]] = []

    def begin(self) -> None:
        self.begin_cpu, self.begin_wall = time.process_time(), time.perf_counter()

    def mark(self) -> None:
        self.marks.append((time.process_time(), time.perf_counter(), self.tokens))

    def add_tokens(self, n: float) -> None:
        self.tokens += float(n)


REC = Recorder()


def _mask_tokens(batch: Any) -> float:
    """Non-pad tokens of a collated batch: the sum of every ``*attention_mask`` entry."""
    total = 0.0
    items = batch.items() if isinstance(batch, dict) else vars(batch).items()
    for key, value in items:
        if key.endswith("attention_mask") and hasattr(value, "sum"):
            total += float(value.sum())
    return total


# ---- ours ------------------------------------------------------------------------------------


def run_ours(algo: str, settings: dict[str, Any]) -> dict[str, Any]:
    import training.core.tracking as tracking
    from training.core.cli import _quiet_libraries, config_from_dict, load_command

    original_update = tracking.Progress.update

    def update(self: Any, n: int = 1, **postfix: Any) -> None:
        if n > 0:  # the trainers call update(start) once with 0 before the first step
            REC.mark()
        original_update(self, n, **postfix)

    tracking.Progress.update = update  # type: ignore[method-assign]

    if algo in ("reward", "dpo"):
        import importlib

        module = importlib.import_module(f"training.core.{algo}")

        def counting(collate: Any) -> Any:
            def counted(*args: Any, **kwargs: Any) -> Any:
                batch = collate(*args, **kwargs)
                REC.add_tokens(_mask_tokens(batch))
                return batch

            return counted

        # The step's batch comes from one of these (older trainers tokenise in every step).
        for name in ("collate_pairs", "collate_encoded_pairs"):
            if hasattr(module, name):
                setattr(module, name, counting(getattr(module, name)))
    else:
        from training.core import generation

        generate = generation.TransformersGenerator.generate

        def counted_generate(self: Any, *args: Any, **kwargs: Any) -> Any:
            out = generate(self, *args, **kwargs)
            REC.add_tokens(float(out.attention_mask.sum()))
            return out

        generation.TransformersGenerator.generate = counted_generate  # type: ignore[method-assign]

    config_class, run = load_command(algo)
    config = config_from_dict(config_class, settings)
    _quiet_libraries()
    REC.begin()
    metrics = run(config)
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


# ---- TRL -------------------------------------------------------------------------------------


def _trl_common(output_dir: str, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "output_dir": output_dir,
        "bf16": False,  # TRL's default is True even on CPU
        "gradient_checkpointing": False,  # TRL's default is True
        "use_cpu": True,
        "report_to": [],
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 0,
        "dataloader_num_workers": 0,
        "lr_scheduler_type": "linear",
        "max_grad_norm": 1.0,
        "weight_decay": 0.0,
        "warmup_steps": 0,
        **settings,
    }


def run_trl(algo: str, paths: dict[str, str], settings: dict[str, Any], out_dir: str) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    class Timing(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            REC.mark()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            REC.logs.append(dict(logs or {}))

    def rows(path: str) -> list[dict[str, Any]]:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    from datasets import Dataset

    settings = dict(settings)
    trainer: Any
    if algo in ("reward", "dpo"):
        data = Dataset.from_list(rows(paths["pairs"]))
        if algo == "reward":
            from trl import RewardConfig, RewardTrainer

            REC.begin()
            trainer = RewardTrainer(
                model=paths["model"],
                args=RewardConfig(**_trl_common(out_dir, settings)),
                train_dataset=data,
                callbacks=[Timing()],
            )
        else:
            from trl import DPOConfig, DPOTrainer

            REC.begin()
            trainer = DPOTrainer(
                model=paths["model"],
                args=DPOConfig(**_trl_common(out_dir, settings)),
                train_dataset=data,
                callbacks=[Timing()],
            )
        collator = trainer.data_collator

        def counting_collator(features: Any) -> Any:
            batch = collator(features)
            REC.add_tokens(_mask_tokens(batch))
            return batch

        trainer.data_collator = counting_collator
    elif algo in ("grpo", "rloo"):
        data = Dataset.from_list([{"prompt": r["prompt"]} for r in rows(paths["prompts"])])
        if algo == "grpo":
            from trl import GRPOConfig as Config
            from trl import GRPOTrainer as Trainer
        else:
            from trl import RLOOConfig as Config  # type: ignore[assignment]
            from trl import RLOOTrainer as Trainer  # type: ignore[assignment]
        REC.begin()
        trainer = Trainer(
            model=paths["model"],
            reward_funcs=paths["reward_model"],
            args=Config(**_trl_common(out_dir, settings)),
            train_dataset=data,
            callbacks=[Timing()],
        )
        # Rollout tokens: TRL logs a running ``num_tokens`` (prompt + completion, no pad).
    elif algo == "ppo":
        import torch
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        from trl.experimental.ppo import ppo_trainer as ppo_module

        REC.begin()
        tokenizer = AutoTokenizer.from_pretrained(paths["model"])
        tokenizer.padding_side = "left"
        prompts = rows(paths["prompts"])
        ids = [
            tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True)
            for r in prompts
        ]
        ids = [x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x for x in ids]
        data = Dataset.from_list([{"input_ids": list(x)} for x in ids])
        policy = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32)
        value = AutoModelForSequenceClassification.from_pretrained(
            paths["reward_model"], num_labels=1, dtype=torch.float32
        )
        reward = AutoModelForSequenceClassification.from_pretrained(
            paths["reward_model"], num_labels=1, dtype=torch.float32
        )
        generation = ppo_module.batch_generation
        pad_id = tokenizer.pad_token_id

        def counted_generation(model: Any, queries: Any, *args: Any, **kwargs: Any) -> Any:
            out = generation(model, queries, *args, **kwargs)
            query_responses = out[0]
            width = queries.shape[1]
            prompt_tokens = (queries != pad_id).sum()
            response = query_responses[:, width:]
            # Responses are scored in full (stop_token None); count every sampled token.
            REC.add_tokens(float(prompt_tokens) + response.numel())
            return out

        ppo_module.batch_generation = counted_generation
        trainer = PPOTrainer(
            args=PPOConfig(
                **_trl_common(out_dir, settings),
                sft_model_path=paths["model"],
                reward_model_path=paths["reward_model"],
            ),
            processing_class=tokenizer,
            model=policy,
            ref_model=ref,
            reward_model=reward,
            value_model=value,
            train_dataset=data,
            callbacks=[Timing()],
        )
    else:
        raise SystemExit(f"unknown algo {algo}")
    trainer.train()
    if algo in ("grpo", "rloo"):
        logged = [log["num_tokens"] for log in REC.logs if "num_tokens" in log]
        # Spread the running count over the marks so tokens/step reads like the others.
        if logged and REC.marks:
            per_step = logged[-1] / len(REC.marks)
            REC.marks = [(c, w, per_step * (i + 1)) for i, (c, w, _) in enumerate(REC.marks)]
    last = next(
        (log for log in reversed(REC.logs) if "loss" in log or "loss/policy_avg" in log), {}
    )
    return {k: v for k, v in last.items() if isinstance(v, int | float)}


# ---- main ------------------------------------------------------------------------------------


def summarise(warmup: int) -> dict[str, Any]:
    marks = REC.marks
    starts = [(REC.begin_cpu, REC.begin_wall, 0.0), *marks[:-1]]
    cpu = [m[0] - s[0] for s, m in zip(starts, marks, strict=True)]
    wall = [m[1] - s[1] for s, m in zip(starts, marks, strict=True)]
    toks = [m[2] - s[2] for s, m in zip(starts, marks, strict=True)]
    keep = slice(min(warmup, max(len(marks) - 1, 0)), None)
    return {
        "steps": len(marks),
        "step_cpu_s": cpu,
        "step_wall_s": wall,
        "step_tokens": toks,
        "median_cpu_s": statistics.median(cpu[keep]) if marks else None,
        "median_wall_s": statistics.median(wall[keep]) if marks else None,
        "tokens_per_step": statistics.mean(toks[keep]) if marks else None,
        "setup_cpu_s": marks[-1][0] - REC.begin_cpu if marks else None,
        "setup_wall_s": marks[-1][1] - REC.begin_wall if marks else None,
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "accelerate", "trl", "datasets", "peft"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["ours", "trl"], required=True)
    parser.add_argument("--algo", required=True)
    parser.add_argument("--paths", required=True, help="JSON: model, reward_model, pairs, prompts")
    parser.add_argument("--settings", required=True, help="JSON of trainer settings")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", default="", help="write a cProfile of the run here")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import_cpu = time.process_time() - T_START_CPU
    paths = json.loads(args.paths)
    settings = json.loads(args.settings)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    if args.impl == "ours":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        final = run_ours(args.algo, settings)
    else:
        final = run_trl(args.algo, paths, settings, args.output_dir)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    result = {
        "impl": args.impl,
        "algo": args.algo,
        **summarise(args.warmup),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "process_cpu_s": time.process_time() - T_START_CPU,
        "process_wall_s": time.perf_counter() - T_START_WALL,
        "torch_import_cpu_s": import_cpu,
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "final_metrics": final,
        "settings": settings,
    }
    Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
