"""training.core must stay importable without Django: the web app calls it, never the reverse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import training.core

SCRIPT = """
import importlib, pkgutil, sys
import training.core
names = [m.name for m in pkgutil.iter_modules(training.core.__path__, "training.core.")]
for name in names:
    importlib.import_module(name)
bad = sorted(m for m in sys.modules if m == "django" or m.startswith(("django.", "annotation", "celery")))
print(len(names), "modules;", "forbidden:", bad)
sys.exit(1 if bad else 0)
"""


def test_importing_every_core_module_loads_no_django() -> None:
    root = Path(training.core.__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "forbidden: []" in result.stdout
