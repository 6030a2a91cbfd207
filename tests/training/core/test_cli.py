"""``python -m training.core``: flags built from the config dataclasses, and real runs end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.core.cli import COMMANDS, CommandUnavailable, load_command, main, parse_config
from training.core.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[3]
MINE = ["sft", "reward", "generate", "evaluate"]


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"  {command} " in out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_help_documents_every_option(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        config_class, _ = load_command(command)
    except CommandUnavailable:
        if command in MINE:
            raise
        assert main([command]) == 2  # a module still missing gives a clear error, not a traceback
        assert f"command {command!r} is not available" in capsys.readouterr().err
        return
    with pytest.raises(SystemExit) as exit_info:
        parse_config(command, ["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--config FILE" in out
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        assert flag in out, flag
        if field.type in ("bool", bool):
            assert f"--no-{field.name.replace('_', '-')}" in out
        help_text = " ".join(field.metadata["help"].split())
        assert help_text[:30] in out, field.name


def test_config_file_values_are_overridden_by_flags(tmp_path: Path) -> None:
    config_file = tmp_path / "run.json"
    config_file.write_text(
        json.dumps({"lapse": 0.1, "max_steps": 7, "normalize": True, "ensemble-size": 3})
    )
    config = parse_config(
        "reward", ["--config", str(config_file), "--max-steps", "9", "--no-normalize"]
    )
    assert (config.lapse, config.max_steps, config.normalize, config.ensemble_size) == (
        0.1,
        9,
        False,
        3,
    )
    config_file.write_text(json.dumps({"learning_rat": 0.1}))
    with pytest.raises(ValueError, match="learning_rat"):
        parse_config("reward", ["--config", str(config_file)])


def test_unknown_command_and_bad_flag_fail_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train-everything"]) == 2
    assert "unknown command" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["reward", "--max-steps", "many"])
    assert exit_info.value.code == 2


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "training.core", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_reward_end_to_end(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": f"Q{i}?", "chosen": f"blue {i}", "rejected": f"red {i}"} for i in range(24)],
    )
    out = tmp_path / "rm"
    result = run_cli(
        "reward",
        f"--model={tiny_model_dir}",
        f"--data={data}",
        f"--output-dir={out}",
        "--device=cpu",
        "--max-steps=6",
        "--batch-size=4",
        "--learning-rate=3e-3",
    )
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "run_config.json",
        "eval.json",
    ):
        assert (out / name).exists(), name
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")][:6] == [1, 2, 3, 4, 5, 6]
    figures = json.loads((out / "eval.json").read_text())
    assert {"eval_accuracy", "eval_ece", "eval_brier", "reward_gain"} <= figures.keys()
    assert json.loads(result.stdout.strip().splitlines()[-1]) == pytest.approx(figures)
    assert json.loads((out / "run_config.json").read_text())["command"] == "reward"
    # stderr is not a terminal here: plain progress lines, no carriage-return bar
    assert "reward: 6/6" in result.stderr
    assert "\r" not in result.stderr


def test_sft_end_to_end(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(
        tmp_path / "sft.jsonl",
        [{"prompt": f"Say {i}", "completion": f"Number {i}."} for i in range(8)],
    )
    out = tmp_path / "sft"
    result = run_cli(
        "sft",
        f"--model={tiny_model_dir}",
        f"--data={data}",
        f"--eval-data={data}",
        f"--output-dir={out}",
        "--device=cpu",
        "--max-steps=5",
        "--batch-size=4",
        "--learning-rate=1e-2",
    )
    for name in (
        "model.safetensors",
        "tokenizer.json",
        "run_config.json",
        "eval.json",
        "metrics.jsonl",
    ):
        assert (out / name).exists(), name
    assert "eval_nll" in json.loads((out / "eval.json").read_text())
    assert "sft: 5/5" in result.stderr


def test_generate_writes_the_annotation_import_format(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": "Hello?"}, {"prompt": [{"role": "user", "content": "Hi"}]}],
    )
    out = tmp_path / "gen"
    code = main(
        [
            "generate",
            f"--model={tiny_model_dir}",
            f"--data={data}",
            f"--output-dir={out}",
            "--device=cpu",
            "--num-samples=2",
            "--max-new-tokens=5",
            "--source=policy-v1",
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == [
        [{"role": "user", "content": "Hello?"}],
        [{"role": "user", "content": "Hi"}],
    ]
    for line in lines:
        assert set(line) == {"prompt", "completions"}
        assert len(line["completions"]) == 2
        assert all(
            set(c) == {"text", "source"} and c["source"] == "policy-v1" for c in line["completions"]
        )
