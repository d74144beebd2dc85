"""What a report is of (task, model, precision, prompt format) and where reports live: the flags
the sweep and the analysis share, and the folder and prompts they lead to."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from h2o import models
from h2o.serve import helm_io
from h2o.serve.options import CHAT_TEMPLATE
from h2o.serve.prompts import encode
from lab_helm.tasks import TASKS, get_task  # the tasks and their requests (needs no HELM)

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ReportSettings:
    """What a report is of; settings.json records all but `reports`."""

    task: str = "xsum"
    model: str = models.DEFAULT_MODEL
    arch: str = "llama"
    chat_template: str = "auto"
    dtype: str = "float32"
    reports: str = str(ROOT / "reports")  # the folder of every report

    @staticmethod
    def add_flags(p: argparse.ArgumentParser) -> None:
        """The flags of these fields, of the same names and defaults."""
        p.add_argument("--task", default=ReportSettings.task, choices=sorted(TASKS))
        p.add_argument("--model", default=ReportSettings.model)
        p.add_argument("--arch", default=ReportSettings.arch)
        p.add_argument("--chat_template", default=ReportSettings.chat_template, choices=CHAT_TEMPLATE)
        p.add_argument("--dtype", default=ReportSettings.dtype, choices=sorted(models.DTYPES),
                       help="bfloat16: about twice as fast as float32 on CPUs with AVX512-BF16")
        p.add_argument("--reports", default=ReportSettings.reports, help="folder of the reports")

    @property
    def folder(self) -> Path:
        """This report's folder: `<reports>/<task>-<model>`."""
        return Path(self.reports) / f"{self.task}-{_slug(self.model)}"

    @property
    def requests(self) -> Path:
        """The task's HELM requests, as run_helm.py reads them."""
        return get_task(self.task).requests

    def task_prompts(self, tokenizer: PreTrainedTokenizerBase, n: int) -> tuple[list[helm_io.Request], list[list[int]]]:
        """The task's first `n` requests and their prompts' token ids, formatted as the runs format them."""
        requests = helm_io.read_requests(self.requests)[:n]
        return requests, [encode(tokenizer, r.prompt, self.chat_template)[0] for r in requests]


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).stem if model.endswith(".gguf") else model).strip("_")
