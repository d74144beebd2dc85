"""A HELM client that answers from a results jsonl instead of a model.

Registered for the h2o-lab/* deployments; each deployment of a suite's prod_env (lab_helm.suite_env)
names its results file in the client's `results_path`. It answers each HELM request with the
result whose request is the same (see lab_helm.requests), keeps the tokens and their logprobs, and
raises (never retried) on a request that has no result: nothing is made up, nothing is cached.
"""

from __future__ import annotations

from helm.clients.client import Client
from helm.common.request import GeneratedOutput, Request, RequestResult, Token
from helm.proxy.retry import NonRetriableException

from lab_helm import results
from lab_helm.requests import differences, request_dict, snippet


class MissingResultError(NonRetriableException):
    pass


def _output(choice: dict) -> GeneratedOutput:
    logprobs = choice.get("logprobs") or {}
    texts = logprobs.get("tokens") or []
    values = [v if v is not None else 0.0 for v in (logprobs.get("token_logprobs") or [])]
    tokens = [Token(text=str(t), logprob=float(v)) for t, v in zip(texts, values)]
    reason = choice.get("finish_reason")
    return GeneratedOutput(
        text=choice["text"],
        logprob=float(sum(values)),
        tokens=tokens,
        finish_reason={"reason": reason} if reason is not None else None,
    )


class ResultsFileClient(Client):
    def __init__(self, results_path: str):
        self.path = results_path
        self.by_prompt = results.index(results.load(self.path), self.path)

    def make_request(self, request: Request) -> RequestResult:
        wanted = request_dict(request)
        record = self.by_prompt.get(wanted["prompt"])
        if record is None:
            raise MissingResultError(f"{self.path} has no result for HELM's request {snippet(wanted['prompt'])}")
        diff = differences(record.request, wanted)
        if diff:
            raise MissingResultError(f"{self.path}:{record.line}: {'; '.join(diff)}")
        result = record.result
        seconds = result.get("request_time")
        seconds = float(seconds) if isinstance(seconds, (int, float)) else None
        batch_size = result.get("batch_size")
        batch_size = int(batch_size) if isinstance(batch_size, int) and batch_size > 0 else None
        return RequestResult(
            success=True,
            cached=False,
            # The request's latency (the reference engine: its lock-step batch's wall time; the fast engine:
            # its admission to its end), given as HELM's offline batch timing: HELM's runtime is this latency and
            # its denoised runtime the latency over batch_size, the time per request with the batch's rows full.
            request_time=seconds,
            batch_request_time=seconds if batch_size else None,
            batch_size=batch_size,
            completions=[_output(choice) for choice in result["choices"]],
            embedding=[],
        )
