"""HELM scenarios of the lab's long-input tasks, read from the examples staged by lab_helm.scenario_data.

Like HELM's XSUM scenario, each reads a pickle in <output>/scenarios/<name>/data/ that the export
and our_run.sh write (the first N examples, all as the test split), so HELM asks for exactly the
requests of data/<task>.jsonl, offline. Each prompt is built whole here, sized with the tokenizer
HELM counts with: the adapter adds nothing around it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import List

from helm.benchmark.presentation.taxonomy_info import TaxonomyInfo
from helm.benchmark.scenarios.scenario import (CORRECT_TAG, TEST_SPLIT, Input, Instance, Output, Reference, Scenario,
                                               ScenarioMetadata)

from lab_helm import longbench, needle, tokenizer
from lab_helm.tasks import get_task


def staged_examples(task_name: str, output_path: str) -> list[dict]:
    path = Path(output_path) / "data" / get_task(task_name).pickle_name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: stage it with python -m lab_helm.scenario_data --task {task_name}")
    with open(path, "rb") as f:
        return pickle.load(f)["test"]


def _instance(prompt: str, answer: str) -> Instance:
    return Instance(Input(text=prompt), references=[Reference(Output(text=answer), tags=[CORRECT_TAG])],
                    split=TEST_SPLIT)


class MultiNewsScenario(Scenario):
    name = "lab_multi_news"
    description = ("LongBench's MultiNews (Bai et al., 2023): a one-page summary of several news articles; "
                   "LongBench's prompt, cut in the middle to fit 8,192 tokens with 512 to generate")
    tags = ["summarization", "long_context"]

    def get_instances(self, output_path: str) -> List[Instance]:
        examples = staged_examples("multi_news", output_path)
        with tokenizer.shared() as tok:
            return [_instance(longbench.prompt(e["context"], tok), e["summary"]) for e in examples]

    def get_metadata(self) -> ScenarioMetadata:
        return ScenarioMetadata(
            name=self.name, display_name="MultiNews (LongBench)", description=self.description,
            main_metric="rouge_l", main_split=TEST_SPLIT,
            taxonomy=TaxonomyInfo(task="multi-document summarization", what="news articles", who="journalists",
                                  when="before 2019", language="English"),
        )


class NeedleScenario(Scenario):
    name = "lab_needle"
    description = ("RULER-style needle in a haystack (Hsieh et al., 2024): a key's 7-digit number hidden at a "
                   "depth of a noise haystack of 1k to 8k tokens")
    tags = ["retrieval", "long_context"]
    display_name = "Needle in a haystack"
    taxonomy = TaxonomyInfo(task="retrieval", what="synthetic", who="generated", when="now", language="English")
    task = "needle"
    prompt = staticmethod(needle.prompt)

    def get_instances(self, output_path: str) -> List[Instance]:
        examples = staged_examples(self.task, output_path)
        with tokenizer.shared() as tok:
            return [_instance(self.prompt(e, tok), e["value"]) for e in examples]

    def get_metadata(self) -> ScenarioMetadata:
        return ScenarioMetadata(
            name=self.name, display_name=self.display_name, description=self.description,
            main_metric="ruler_string_match_part", main_split=TEST_SPLIT, taxonomy=self.taxonomy,
        )


class NeedleEssayScenario(NeedleScenario):
    name = "lab_needle_essay"
    description = ("RULER's essay needle (Hsieh et al., 2024, niah_single_2): the needle task's 7-digit numbers "
                   "hidden in natural prose, the lab's XSUM articles, of 1k to 8k tokens")
    display_name = "Needle in an essay"
    taxonomy = TaxonomyInfo(task="retrieval", what="news prose with a synthetic needle", who="BBC, generated",
                            when="2010-2017, now", language="English")
    task = "needle_essay"
    prompt = staticmethod(needle.essay_prompt)
