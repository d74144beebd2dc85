"""The lab's lm-eval tasks: lm-eval's own task configs (`include:`), read from the vendored files
under `data/lm_eval/` (`dataset_path: json`) instead of the hub.

The YAMLs in `tasks/` name lm-eval's installed task folder as `${LM_EVAL_TASKS}` and the data
folder as `${DATA}`; `stage` writes them with both filled in (lm-eval resolves `include:` and
`data_files` as paths, and neither place is known before run time).
"""

from __future__ import annotations

from pathlib import Path

import yaml

TEMPLATES = Path(__file__).resolve().parent / "tasks"
DATA = Path(__file__).resolve().parents[3] / "data" / "lm_eval"
# The paper's scripts (h2o_hf/scripts/lm_eval/*.sh) run every task 5-shot.
PAPER_SHOTS = 5


class BadInput(ValueError):
    """Bad input to an lm-eval command: one line, exit status 2."""


def known() -> list[str]:
    """The task names the lab serves, sorted."""
    return sorted(p.stem for p in TEMPLATES.glob("*.yaml"))


def check_names(names: list[str], flag: str = "--tasks") -> None:
    """Every name one of the lab's tasks (lm-eval's others would read the hub)."""
    for name in names:
        if name not in known():
            raise BadInput(f"{flag}: unknown task {name!r}; known: {', '.join(known())}")
    if not names:
        raise BadInput(f"{flag}: no task given; known: {', '.join(known())}")


def lm_eval_tasks() -> Path:
    """lm-eval's installed task folder."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def render(name: str, data: Path = DATA) -> str:
    """Task `name`'s YAML with lm-eval's folder and `data` filled in; a data file it names that is
    missing is an error naming that file and the task."""
    template = TEMPLATES / f"{name}.yaml"
    text = template.read_text().replace("${LM_EVAL_TASKS}", str(lm_eval_tasks())).replace("${DATA}", str(data))
    for split, path in yaml.safe_load(text)["dataset_kwargs"]["data_files"].items():
        if not Path(path).is_file():
            raise BadInput(f"{path}: missing ({name}'s {split} split, named in {template})")
    return text


def stage(names: list[str], folder: Path, data: Path = DATA) -> Path:
    """`folder` holding the rendered YAMLs of `names`, for lm-eval's `--include_path`."""
    check_names(names)
    rendered = {name: render(name, data) for name in names}  # every check before any write
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (folder / f"{name}.yaml").write_text(text)
    return folder
