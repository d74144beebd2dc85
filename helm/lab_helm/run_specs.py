"""The lab's HELM run specs, loaded by `helm-run --plugins lab_helm.run_specs`:

- `lab_multi_news`: LongBench's MultiNews, 512 new tokens, scored by ROUGE-1/2/L (LongBench's
  score is ROUGE-L F1);
- `lab_needle`: the needle in a haystack, 64 new tokens, scored by HELM's RULER string match
  (1 when the answer holds the hidden number, else 0);
- `lab_needle_essay`: the same needles in prose (RULER's essay variant), scored the same way.

All generate greedily with no stop sequence, as LongBench and RULER do: a chat model's answer
ends at its end-of-turn token.
"""

from __future__ import annotations

from helm.benchmark.adaptation.adapter_spec import ADAPT_GENERATION, AdapterSpec
from helm.benchmark.metrics.common_metric_specs import get_basic_metric_specs
from helm.benchmark.metrics.metric import MetricSpec
from helm.benchmark.run_spec import RunSpec, run_spec_function
from helm.benchmark.scenarios.scenario import ScenarioSpec

from lab_helm import longbench, needle


def _adapter(max_tokens: int) -> AdapterSpec:
    """The prompt is the instance's text alone: the scenario built all of it."""
    return AdapterSpec(
        method=ADAPT_GENERATION, global_prefix="", global_suffix="", instructions="", input_prefix="",
        input_suffix="", output_prefix="", output_suffix="", instance_prefix="", max_train_instances=0,
        num_outputs=1, temperature=0.0, max_tokens=max_tokens, stop_sequences=[],
    )


@run_spec_function("lab_multi_news")
def get_multi_news_spec() -> RunSpec:
    return RunSpec(
        name="lab_multi_news",
        scenario_spec=ScenarioSpec(class_name="lab_helm.scenarios.MultiNewsScenario", args={}),
        adapter_spec=_adapter(longbench.MAX_TOKENS),
        metric_specs=get_basic_metric_specs(["rouge_1", "rouge_2", "rouge_l"]),
        groups=["lab_multi_news"],
    )


@run_spec_function("lab_needle")
def get_needle_spec() -> RunSpec:
    return RunSpec(
        name="lab_needle",
        scenario_spec=ScenarioSpec(class_name="lab_helm.scenarios.NeedleScenario", args={}),
        adapter_spec=_adapter(needle.MAX_TOKENS),
        metric_specs=get_basic_metric_specs([])
        + [MetricSpec(class_name="helm.benchmark.metrics.ruler_qa_metrics.RulerQAMetric", args={})],
        groups=["lab_needle"],
    )


@run_spec_function("lab_needle_essay")
def get_needle_essay_spec() -> RunSpec:
    return RunSpec(
        name="lab_needle_essay",
        scenario_spec=ScenarioSpec(class_name="lab_helm.scenarios.NeedleEssayScenario", args={}),
        adapter_spec=_adapter(needle.MAX_TOKENS),
        metric_specs=get_basic_metric_specs([])
        + [MetricSpec(class_name="helm.benchmark.metrics.ruler_qa_metrics.RulerQAMetric", args={})],
        groups=["lab_needle_essay"],
    )
