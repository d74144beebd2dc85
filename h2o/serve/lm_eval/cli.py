"""`python -m h2o.serve.lm_eval ARGS`: lm-eval's own command line (`lm-eval run ARGS`), with the
`h2o-lab` model registered and the lab's tasks staged as its `--include_path`.

lm-eval's CLI discovers no plugins, so this registers the model, checks `--tasks` against the
lab's tasks (any other would be read from the hub) and their data files, then runs lm-eval's
CLI with the hub switched off. Bad input is one line naming the flag or file, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from h2o.serve.lm_eval.tasks import BadInput, check_names, stage

PROG = "h2o.serve.lm_eval"


def offline() -> None:
    """Nothing from the hub: set before `datasets` or `huggingface_hub` is imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def refusing_bad_input(prog: str, run: Callable[[], None]) -> int:
    """`run()` with the hub switched off: 0, or 2 for bad input, said in one line naming `prog`."""
    offline()
    try:
        run()
    except BadInput as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


def task_names(argv: list[str]) -> list[str]:
    """The names `--tasks` / `-t` gives, space- or comma-separated as lm-eval takes them."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--tasks", "-t", nargs="+", default=[])
    flags.add_argument("--include_path")
    given, _ = flags.parse_known_args(argv)
    if given.include_path is not None:
        raise BadInput("--include_path: the lab's tasks are its include path; add a task as a YAML in "
                       "h2o/serve/lm_eval/tasks/")
    return [name for part in given.tasks for name in part.split(",") if name]


def run_lm_eval(argv: list[str]) -> None:
    """lm-eval's `run` over `argv`, the lab's tasks staged for the call's duration."""
    names = task_names(argv)
    check_names(names)  # before the slow imports
    import lm_eval.__main__

    import h2o.serve.lm_eval.model  # noqa: F401  (registers h2o-lab)

    with tempfile.TemporaryDirectory(prefix="h2o-lm-eval-tasks-") as folder:
        tasks = stage(names, Path(folder))
        saved = sys.argv
        sys.argv = ["lm-eval", "run", *argv, "--include_path", str(tasks)]
        try:
            lm_eval.__main__.cli_evaluate()
        finally:
            sys.argv = saved


def main(argv: list[str] | None = None) -> int:
    """0 once lm-eval has printed its table; 2 for bad input, said in one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m {PROG} --model h2o-lab --model_args pretrained=smollm2,policy=h2o,"
              "heavy_ratio=0.1,recent_ratio=0.1 --tasks copa [lm-eval run's other flags]\n"
              "h2o-lab's model_args: pretrained, model_arch, policy (none: full cache), heavy_ratio, recent_ratio, "
              "kv_mode (mask|drop), attention, loglikelihood (sum|mean), sink_size, dtype, device, add_bos_token")
        return 0
    return refusing_bad_input(PROG, lambda: run_lm_eval(argv))
