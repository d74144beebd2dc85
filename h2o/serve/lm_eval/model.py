"""`h2o-lab`, the lab's model in lm-eval's registry: loglikelihood requests scored through the
reference engine with the full cache or any policy's small cache (`h2o.engine.reference.scoring`).

    --model h2o-lab --model_args pretrained=smollm2,policy=h2o,heavy_ratio=0.1,recent_ratio=0.1

`kv_mode=mask` (default) is the paper's simulation, one forward under its whole-text heavy-hitter
mask; `kv_mode=drop` evicts for real, the context prefilled and the continuation fed token by
token. `loglikelihood=sum` (default) is lm-eval's own; `loglikelihood=mean`, the mean over the
continuation's tokens, is what the paper's `evaluate_task_result.py` hands lm-eval.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from h2o import models
from h2o.engine.reference.attention import ATTENTION_IMPLEMENTATIONS
from h2o.engine.reference.evicting_cache import KV_MODES
from h2o.engine.reference.generation import Eviction
from h2o.engine.reference.scoring import TokenScores, score
from h2o.policies import POLICIES, WithSinks, make_policy
from h2o.serve.lm_eval.tasks import BadInput

LOGLIKELIHOODS = ("sum", "mean")
log = logging.getLogger("h2o-lab")


@dataclass(frozen=True)
class LabModelArgs:
    """`--model_args` of `h2o-lab`; `policy` none (the default) is the full cache."""

    pretrained: str = models.DEFAULT_MODEL
    model_arch: str = "llama"
    policy: str = "none"
    heavy_ratio: float = 0.1
    recent_ratio: float = 0.1
    kv_mode: str = "mask"
    attention: str = "eager"
    loglikelihood: str = "sum"
    sink_size: int = 4
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 1
    add_bos_token: bool = False
    cache_dir: str | None = None

    @classmethod
    def parse(cls, given: dict[str, object]) -> LabModelArgs:
        names = [f.name for f in fields(cls)]
        for key in given:
            if key not in names:
                raise BadInput(f"--model_args: unknown argument {key!r}; known: {', '.join(names)}")
        args = cls(**given)
        args.check()
        return args

    def check(self) -> None:
        if self.policy != "none" and self.policy not in POLICIES:
            raise BadInput(f"--model_args policy: unknown policy {self.policy!r}; known: none, "
                           f"{', '.join(sorted(POLICIES))}")
        for name, allowed in (("kv_mode", KV_MODES), ("attention", tuple(ATTENTION_IMPLEMENTATIONS)),
                              ("loglikelihood", LOGLIKELIHOODS)):
            if getattr(self, name) not in allowed:
                raise BadInput(f"--model_args {name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise BadInput(f"--batch_size: must be a whole number of at least 1, got {self.batch_size!r}")

    def eviction(self) -> Eviction | None:
        """The small cache these arguments ask for, or None for the full cache."""
        if self.policy == "none":
            return None
        options = {"sink_size": self.sink_size} if issubclass(POLICIES[self.policy], WithSinks) else {}
        try:
            policy = make_policy(self.policy, float(self.heavy_ratio), float(self.recent_ratio), **options)
        except ValueError as error:
            raise BadInput(f"--model_args: {error}") from None
        if self.kv_mode == "mask" and not policy.uses_base_selection():
            raise BadInput(f"--model_args policy: {self.policy!r} selects tokens its own way, which has no "
                           "whole-text mask; use kv_mode=drop")
        return Eviction(policy, self.kv_mode, self.attention)


def _lm_eval_args(given: dict[str, object]) -> dict[str, object]:
    """lm-eval's own keywords (`--batch_size`, `--device`) in the lab's form; `auto` sizes and
    lm-eval's `max_batch_size` have no meaning for this model. lm-eval's `--device` defaults to
    cuda: on a machine without one, the CPU, said in one log line."""
    given = dict(given)
    given.pop("max_batch_size", None)
    if str(given.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
        log.warning("--device %s: no CUDA device here; scoring on the CPU", given["device"])
        given["device"] = "cpu"
    if "batch_size" in given:
        text = str(given["batch_size"])
        if not text.isdigit():
            raise BadInput(f"--batch_size: must be a whole number of at least 1, got {text!r}")
        given["batch_size"] = int(text)
    return given


@register_model("h2o-lab")
class LabLM(TemplateLM):
    """lm-eval's loglikelihood and multiple-choice requests through the lab's reference engine."""

    def __init__(self, **given: object) -> None:
        super().__init__()
        self.args = LabModelArgs.parse(_lm_eval_args(given))
        self.eviction = self.args.eviction()
        try:
            self.tokenizer, config = models.load_tokenizer(self.args.pretrained, self.args.model_arch,
                                                           self.args.cache_dir)
            self.model = models.load_model(self.args.pretrained, self.args.device, self.args.dtype,
                                           cache_dir=self.args.cache_dir)
        except (ValueError, FileNotFoundError) as error:
            raise BadInput(f"--model_args: {error}") from None
        self.max_length = getattr(config, "max_position_embeddings", None) or 2048
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def kv_cache(self) -> dict[str, object]:
        """The cache results are scored with, as results files record it."""
        if self.eviction is None:
            return {"policy": None}
        policy = self.eviction.policy
        return {"policy": policy.name, "mode": self.eviction.mode, "heavy_ratio": policy.heavy_ratio,
                "recent_ratio": policy.recent_ratio}

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: object) -> list[int]:
        # The paper tokenizes without special tokens; add_bos_token=true puts the BOS back.
        special = self.args.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_special_tokens=special)

    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[TokenScores]:
        """Each continuation's tokens scored after its context, in batches of similar lengths;
        a text longer than the model's context loses its first tokens, as in lm-eval."""
        texts = [(context + continuation)[-self.max_length:] for context, continuation in pairs]
        starts = [len(text) - len(continuation) for text, (_, continuation) in zip(texts, pairs)]
        for (context, continuation), start in zip(pairs, starts):
            if not continuation or start < 1:
                raise BadInput(f"a continuation of {len(continuation)} tokens after {len(context)} of context "
                               f"does not fit the model's {self.max_length} positions")
        done: dict[int, TokenScores] = {}
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for begin in range(0, len(order), self.args.batch_size):
            rows = order[begin:begin + self.args.batch_size]
            scored = score(self.model, [texts[i] for i in rows], [starts[i] for i in rows], self.eviction, self.pad_id)
            done.update(zip(rows, scored))
        return [done[i] for i in range(len(texts))]

    def loglikelihood_of(self, scored: TokenScores) -> float:
        """The continuation's log-likelihood as `loglikelihood=` asks: lm-eval's sum or the paper's mean."""
        total = sum(scored.logprobs)
        return total / len(scored.logprobs) if self.args.loglikelihood == "mean" else total

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: object) -> list[tuple[float, bool]]:
        scored = self.score_tokens([(context, continuation) for _, context, continuation in requests])
        results = []
        for (pair, _, _), one in zip(requests, scored):
            result = (self.loglikelihood_of(one), one.greedy)
            self.cache_hook.add_partial("loglikelihood", pair, result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        raise BadInput("h2o-lab scores loglikelihood and multiple-choice tasks; this task asks for "
                       "loglikelihood_rolling (perplexity), which it does not serve")

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        raise BadInput("h2o-lab scores loglikelihood and multiple-choice tasks; generation tasks go through "
                       "run_helm.py and HELM")

