"""The command line behind run_helm.py: the flags (`h2o.serve.options`) parsed, the run served
(`h2o.serve.serve`), and what stopped it told in one line with its exit status."""

from __future__ import annotations

import logging
import sys

import torch

from h2o.serve import results
from h2o.serve.options import ServeOptions
from h2o.serve.serve import serve

# What a run reports in one line instead of a traceback.
ERRORS = (ValueError, FileNotFoundError, results.Stopped)


def log_to_stderr() -> None:
    """A run's log lines (engine, resume, speed) on stderr, unless logging is set up already."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """run_helm.py: 0 when the output holds every result."""
    log_to_stderr()
    try:
        serve(ServeOptions.from_argv(argv))
    except ERRORS as error:
        return print_error(error)
    except torch.OutOfMemoryError:
        # At load, or at a batch of one: results already written stay, and a rerun resumes after them.
        print("run_helm.py: error: out of GPU memory; try --fp16, a smaller --batch_size or --device_map auto, "
              "then rerun the same command to resume", file=sys.stderr)
        return 1
    return 0


def print_error(error: Exception) -> int:
    """run_helm.py's line for one of `ERRORS`, on stderr; its exit status: 2 for bad input (nothing
    written), 1 for a failed write, 128 + the signal's number for a signal."""
    if not isinstance(error, results.Stopped):
        print(f"run_helm.py: error: {error}", file=sys.stderr)
        return 2
    interrupted = isinstance(error, results.Interrupted)
    what = f"interrupted ({error})" if interrupted else f"error: {error.strerror}"
    saved = f"; {error.saved}" if error.saved else ""
    print(f"run_helm.py: {what}{saved}; rerun the same command to resume", file=sys.stderr)
    return 128 + error.signum if interrupted else 1
