"""The prod_env of one suite: a HELM model per evaluated results file, each served from its file.

A suite compares points (a KV-cache policy at a budget): each is the model
`h2o-lab/<model_arch>-<point>` (a file evaluated alone keeps `h2o-lab/<model_arch>`), with the
tokenizer and max length of prod_env/'s `h2o-lab/<model_arch>`, so the prompts stay those of the
export, and a display name that says its cache ("H2O 20% (10% heavy + 10% recent)"). The folder,
`<output>/prod_env/<suite>/`, is what helm-run and helm-summarize get as `--local-path`; points
are added to it one evaluation at a time, and keep their order (the leaderboard's row order).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from lab_helm.paths import PROD_ENV
from lab_helm.tasks import deployment

POINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CLIENT = "lab_helm.client.ResultsFileClient"
POLICY_NAMES = {"h2o": "H2O", "tova": "TOVA"}  # the papers' spelling; other policies show their registry name


@dataclass(frozen=True)
class Point:
    name: str | None  # None: a results file evaluated alone
    results: Path

    def model(self, model_arch: str) -> str:
        return deployment(self.arch_slot(model_arch))

    def arch_slot(self, model_arch: str) -> str:
        """What stands after `h2o-lab/` in the model's name (and in HELM's run entry)."""
        return f"{model_arch}-{self.name}" if self.name else model_arch


def parse_point(spec: str) -> Point:
    """NAME=FILE, as our_run.sh takes a point."""
    name, sep, path = spec.partition("=")
    if not sep or not POINT_NAME.fullmatch(name) or not path:
        raise ValueError(f"point {spec!r} must be NAME=FILE, NAME of letters, digits, '.', '_' or '-'")
    return Point(name, Path(path))


def folder(output_path: str | Path, suite: str) -> Path:
    return Path(output_path) / "prod_env" / suite


def summary_path(output_path: str | Path, suite: str, model: str) -> Path:
    """The generation summary (KV cache, speed) of one model of a suite, beside HELM's runs."""
    return Path(output_path) / "runs" / suite / f"generation-{model.split('/', 1)[1]}.json"


def models(env: Path) -> list[str]:
    """The suite's models, in the order they were added."""
    return [e["name"] for e in _load(env / "model_deployments.yaml", "model_deployments")]


def display_name(kv: dict) -> str:
    """The cache a results file was generated with, from run_helm.py's kv_cache fields."""
    policy = kv.get("policy")
    if policy in (None, "full"):
        return "Full cache"
    heavy, recent = kv.get("heavy_ratio"), kv.get("recent_ratio")
    if heavy is None or recent is None:
        return POLICY_NAMES.get(policy, policy)
    if heavy == 0:
        if policy == "h2o":
            return f"Local {recent:.0%} (recent window only)"
        return f"{POLICY_NAMES.get(policy, policy)} {recent:.0%}"  # a policy that reads only the total
    return f"{POLICY_NAMES.get(policy, policy)} {heavy + recent:.0%} ({heavy:.0%} heavy + {recent:.0%} recent)"


def _template(kind: str, key: str, name: str) -> dict:
    with open(PROD_ENV / f"{kind}.yaml", encoding="utf-8") as f:
        entries = yaml.safe_load(f)[key]
    return next(dict(e) for e in entries if e["name"] == name)


def _load(path: Path, key: str) -> list[dict]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return (yaml.safe_load(f) or {}).get(key) or []


def _upsert(path: Path, key: str, entry: dict) -> None:
    entries = _load(path, key)
    names = [e["name"] for e in entries]
    if entry["name"] in names:
        entries[names.index(entry["name"])] = entry
    else:
        entries.append(entry)
    path.write_text("# Written by our_run.sh for this suite; rewritten on each evaluation.\n"
                    + yaml.safe_dump({key: entries}, sort_keys=False, allow_unicode=True))


def add(env: Path, point: Point, model_arch: str, kv: dict) -> str:
    """Declare (or update) the point's model and deployment in `env`; returns the model's name."""
    env.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PROD_ENV / "tokenizer_configs.yaml", env / "tokenizer_configs.yaml")
    base, model = deployment(model_arch), point.model(model_arch)
    shown = display_name(kv)

    deployment_entry = _template("model_deployments", "model_deployments", base)
    deployment_entry.update(name=model, model_name=model,
                            client_spec={"class_name": CLIENT, "args": {"results_path": str(point.results.resolve())}})
    _upsert(env / "model_deployments.yaml", "model_deployments", deployment_entry)

    metadata = _template("model_metadata", "models", base)
    metadata.update(name=model, display_name=shown,
                    description=f"{shown}, from {point.results.name}. {metadata['description']}")
    _upsert(env / "model_metadata.yaml", "models", metadata)
    return model
