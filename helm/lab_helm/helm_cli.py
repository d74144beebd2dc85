"""Running helm-run from Python: the executable, its arguments, the run directory."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from lab_helm.paths import PROD_ENV

PLUGINS = "lab_helm.run_specs"  # the lab's run specs (lab_multi_news, lab_needle), for --plugins


def executable(name: str) -> str:
    """A HELM command (helm-run, helm-summarize): next to this Python first, then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def run_args(entry: str, suite: str, n: int, output_path: str | Path, dry_run: bool = False) -> list[str]:
    """helm-run's arguments, the same for the export and the evaluation (less --dry-run)."""
    args = [
        executable("helm-run"),
        "--run-entries", entry,
        "--suite", suite,
        "--max-eval-instances", str(n),
        "--num-threads", "1",
        "--disable-cache",
        "--exit-on-error",
        "--local-path", str(PROD_ENV),
        "--output-path", str(output_path),
        "--plugins", PLUGINS,
    ]
    return args + (["--dry-run"] if dry_run else [])


def runs(output_path: str | Path, suite: str, model: str | None = None) -> list[Path]:
    """The run directories of a suite, of one model's runs when `model` is given."""
    folder = Path(output_path) / "runs" / suite
    found = sorted(p for p in folder.iterdir() if (p / "run_spec.json").exists()) if folder.is_dir() else []
    if model is None:
        return found
    return [p for p in found
            if json.loads((p / "run_spec.json").read_text())["adapter_spec"]["model_deployment"] == model]


def run_dir(output_path: str | Path, suite: str, model: str | None = None) -> Path:
    """The one run directory of a suite's model (of the suite, when it holds one run)."""
    found = runs(output_path, suite, model)
    if len(found) != 1:
        of = f" of {model}" if model else ""
        raise FileNotFoundError(f"expected one run{of} in {Path(output_path) / 'runs' / suite}, found {len(found)}")
    return found[0]
