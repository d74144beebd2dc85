"""Make HELM's XSUM metrics run with no network: install what they would otherwise download.

    python -m lab_helm.offline [--check]

Idempotent, offline, into the running Python environment:

1. spaCy's `en_core_web_sm`. HELM's SummarizationMetric downloads it when the package is absent,
   and summ-eval's data-stats metric (coverage, density, compression) loads it, but uses only its
   tokenizer. A pipeline-less package built from `spacy.blank("en")` has the same tokenizer (the
   English rules of the installed spaCy), so we build that as a wheel and pip-install it, with no
   index. A real en_core_web_sm, if present, is left alone.
2. nltk's `punkt_tab`. HELM checks for it when its reference metrics are imported and downloads it
   when missing; neither ROUGE (rouge-score's own tokenizer and nltk's Porter stemmer, which needs
   no data) nor anything else in these metrics uses it. An empty `tokenizers/punkt_tab` folder in
   the environment's nltk_data satisfies the check; a real use of punkt_tab still fails with
   nltk's usual "Resource not found".

`--check` installs nothing: it exits 1 (naming what is missing) unless both are in place.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODEL = "en_core_web_sm"
MARKER = "h2o_lab_stand_in"
PUNKT_README = (
    "Placeholder: HELM checks that nltk's punkt_tab exists when it imports its reference metrics,\n"
    "and downloads it otherwise. The XSUM metrics never use it (ROUGE tokenizes on its own), so\n"
    "this empty folder stands in for it. Written by `python -m lab_helm.offline`.\n"
)

INIT_PY = '''"""Stand-in for spaCy's en_core_web_sm: a blank English pipeline (tokenizer only)."""
from pathlib import Path

from spacy.util import get_model_meta, load_model_from_init_py

__version__ = get_model_meta(Path(__file__).parent)["version"]


def load(**overrides):
    return load_model_from_init_py(__file__, **overrides)
'''


def _spacy_model_status() -> str:
    """'ours', 'real' or 'absent'."""
    import importlib.metadata

    try:
        importlib.metadata.distribution(MODEL)
    except importlib.metadata.PackageNotFoundError:
        return "absent"
    import spacy

    try:
        nlp = spacy.load(MODEL)
    except Exception:  # a broken install: rebuild ours over it
        return "absent"
    return "ours" if nlp.meta.get(MARKER) else "real"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(folder: Path) -> Path:
    """Write the stand-in wheel into `folder` and return its path."""
    import spacy
    from spacy import about

    major, minor = (int(x) for x in about.__version__.split(".")[:2])
    version = f"{major}.{minor}.0"
    nlp = spacy.blank("en")
    nlp.meta.update(
        {
            "name": "core_web_sm",
            "version": version,
            "description": "Stand-in for en_core_web_sm: spacy.blank('en'), the tokenizer only.",
            "spacy_version": f">={major}.{minor}.0,<{major}.{minor + 1}.0",
            "license": "MIT",
            MARKER: True,
        }
    )
    staging = folder / "staging"
    data_dir = staging / MODEL / f"{MODEL}-{version}"
    data_dir.parent.mkdir(parents=True)
    nlp.to_disk(data_dir)
    (staging / MODEL / "__init__.py").write_text(INIT_PY)
    (staging / MODEL / "meta.json").write_text(json.dumps(nlp.meta, indent=2, sort_keys=True))

    dist_info = f"{MODEL}-{version}.dist-info"
    files: dict[str, bytes] = {}
    for path in sorted(p for p in (staging / MODEL).rglob("*") if p.is_file()):
        files[path.relative_to(staging).as_posix()] = path.read_bytes()
    files[f"{dist_info}/METADATA"] = (
        "Metadata-Version: 2.1\n"
        f"Name: {MODEL}\n"
        f"Version: {version}\n"
        "Summary: Stand-in for spaCy's en_core_web_sm (blank English tokenizer), built offline\n"
        f"Requires-Dist: spacy<{major}.{minor + 1}.0,>={major}.{minor}.0\n"
    ).encode()
    files[f"{dist_info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: lab_helm.offline\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{dist_info}/top_level.txt"] = f"{MODEL}\n".encode()
    record = [_record_line(name, data) for name, data in files.items()] + [f"{dist_info}/RECORD,,"]
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()

    wheel = folder / f"{MODEL}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return wheel


def install_spacy_model() -> str:
    status = _spacy_model_status()
    if status == "real":
        return f"{MODEL}: the real model is installed; left alone"
    if status == "ours":
        return f"{MODEL}: stand-in already installed"
    with tempfile.TemporaryDirectory() as tmp:
        wheel = build_wheel(Path(tmp))
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--force-reinstall",
             "--disable-pip-version-check", str(wheel)],
            check=True,
        )
    return f"{MODEL}: stand-in installed (spacy.blank('en') tokenizer)"


def punkt_tab_dir() -> Path:
    return Path(sys.prefix) / "nltk_data" / "tokenizers" / "punkt_tab"


def punkt_tab_found() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
        return True
    except LookupError:
        return False


def install_punkt_tab_placeholder() -> str:
    if punkt_tab_found():
        return "nltk punkt_tab: found"
    folder = punkt_tab_dir()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README").write_text(PUNKT_README)
    return f"nltk punkt_tab: placeholder written to {folder}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="install nothing; exit 1 if something is missing")
    args = p.parse_args(argv)
    if args.check:
        import importlib.metadata
        import importlib.util

        missing = []
        try:  # cheap: no spaCy import
            importlib.metadata.distribution(MODEL)
            installed = importlib.util.find_spec(MODEL) is not None
        except importlib.metadata.PackageNotFoundError:
            installed = False
        if not installed:
            missing.append(f"spaCy's {MODEL}")
        if not punkt_tab_found():
            missing.append("nltk's punkt_tab")
        if missing:
            print(f"offline set-up missing: {', '.join(missing)}; run helm/setup_offline.sh", file=sys.stderr)
            return 1
        return 0
    print(install_spacy_model())
    print(install_punkt_tab_placeholder())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
