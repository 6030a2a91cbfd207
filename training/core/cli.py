"""``python -m training.core <command> [--flags] [--config file.json]``.

Every command is an algorithm module with a config dataclass (a ``CommonConfig`` subclass) and
``run(config) -> dict[str, float]``. Flags are built from the dataclass: field ``max_steps``
becomes ``--max-steps`` with the field's type and help text; booleans get ``--x/--no-x``.
Values come from the dataclass defaults, then the ``--config`` JSON file, then the flags.

Modules are imported only for the command being run, so ``--help`` works even if one
algorithm's module (or its optional dependency) is missing, and that command fails with a
clear message instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# command -> "module:ConfigClass:run_function"
COMMANDS: dict[str, str] = {
    "sft": "training.core.sft:SFTConfig:run",
    "reward": "training.core.reward:RewardConfig:run",
    "dpo": "training.core.dpo:DPOConfig:run",
    "kto": "training.core.kto:KTOConfig:run",
    "ppo": "training.core.ppo:PPOConfig:run",
    "grpo": "training.core.grpo:GRPOConfig:run",
    "rloo": "training.core.rloo:RLOOConfig:run",
    "generate": "training.core.generation:GenerateConfig:run",
    "evaluate": "training.core.evaluate:EvaluateConfig:run",
}

SUMMARIES: dict[str, str] = {
    "sft": "supervised fine-tuning on demonstrations (loss on completion tokens only)",
    "reward": "train a Bradley-Terry reward model on preference pairs",
    "dpo": "direct preference optimisation (and its variants) against a frozen reference",
    "kto": "Kahneman-Tversky optimisation on unpaired good/bad examples",
    "ppo": "PPO with a critic and a KL penalty to the reference policy",
    "grpo": "group-relative policy optimisation",
    "rloo": "REINFORCE with a leave-one-out baseline",
    "generate": "sample completions for prompts into the annotation import format",
    "evaluate": "reward-model accuracy on pairs, or policy KL and reward on prompts",
}


class CommandUnavailable(RuntimeError):
    pass


def load_command(command: str) -> tuple[type[Any], Callable[[Any], dict[str, float]]]:
    """Import the module of ``command`` and return ``(ConfigClass, run)``."""
    if command not in COMMANDS:
        raise CommandUnavailable(f"unknown command {command!r}; choose from {', '.join(COMMANDS)}")
    module_name, class_name, func_name = COMMANDS[command].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CommandUnavailable(
            f"command {command!r} is not available: importing {module_name} failed ({e})"
        ) from e
    try:
        return getattr(module, class_name), getattr(module, func_name)
    except AttributeError as e:
        raise CommandUnavailable(f"command {command!r}: {module_name} has no {e.name}") from e


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _parse_json(text: str) -> Any:
    return json.loads(text)


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type[Any]) -> None:
    """One flag per dataclass field. Defaults are SUPPRESSed so only given flags override."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        kind = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(kind) is typing.Literal:
            choices = typing.get_args(kind)
            parser.add_argument(_flag(f.name), type=type(choices[0]), choices=choices, **kwargs)
        elif kind in (int, float, str):
            parser.add_argument(_flag(f.name), type=kind, metavar=kind.__name__.upper(), **kwargs)
        else:
            parser.add_argument(_flag(f.name), type=_parse_json, metavar="JSON", **kwargs)


def config_from_dict(config_class: type[Any], values: dict[str, Any]) -> Any:
    """Build a config, refusing unknown keys (a typo must not silently fall back to a default)."""
    names = {f.name for f in dataclasses.fields(config_class)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {config_class.__name__} option(s): {', '.join(unknown)}")
    return config_class(**values)


def build_parser(command: str, config_class: type[Any]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m training.core {command}",
        description=SUMMARIES.get(command, ""),
    )
    parser.add_argument(
        "--config",
        dest="__config_file",
        metavar="FILE",
        help="JSON file with option values; flags given on the command line override it.",
    )
    add_config_arguments(parser, config_class)
    return parser


def parse_config(command: str, argv: Sequence[str]) -> Any:
    config_class, _ = load_command(command)
    args = vars(build_parser(command, config_class).parse_args(list(argv)))
    values: dict[str, Any] = {}
    config_file = args.pop("__config_file", None)
    if config_file:
        loaded = json.loads(Path(config_file).read_text(encoding="utf-8"))
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a JSON object of options")
        loaded.pop("command", None)  # a run_config.json written by a previous run
        values.update(loaded)
    values.update(args)
    return config_from_dict(config_class, values)


def _top_help() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        "usage: python -m training.core <command> [options] [--config FILE]",
        "",
        "commands:",
        *(f"  {c:<{width}}  {SUMMARIES[c]}" for c in COMMANDS),
        "",
        "Run `python -m training.core <command> --help` for the options of one command.",
    ]
    return "\n".join(lines)


def _quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = parse_config(command, rest)
        _, run = load_command(command)
    except (CommandUnavailable, ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _quiet_libraries()
    result = run(config)
    if os.environ.get("RANK", "0") == "0":  # one summary line, not one per process
        print(json.dumps(result, sort_keys=True))
    return 0
