"""One HELM `Request` as a line of data/<task>.jsonl, and back to a key.

The export (helm-run --dry-run) and the evaluation (the results client) both go through
`request_dict`, so a request generated from data/xsum.jsonl is recognised by construction.
The field names are those of the paper's request files (OpenAI/Together style: `n`, `stop`),
and HELM's own where those have none (`top_k_per_token`, `echo_prompt`).
"""

from __future__ import annotations

from typing import Any

from helm.common.request import Request


def request_dict(request: Request) -> dict[str, Any]:
    if request.messages or request.multimodal_prompt or request.embedding:
        raise ValueError("only plain text-completion requests can be exported")
    fields: dict[str, Any] = {
        "prompt": request.prompt,
        "temperature": request.temperature,
        "n": request.num_completions,
        "max_tokens": request.max_tokens,
        "stop": list(request.stop_sequences),
        "top_p": request.top_p,
        "top_k_per_token": request.top_k_per_token,
        "echo_prompt": request.echo_prompt,
    }
    # Present only when they matter, so the usual request stays short.
    if request.presence_penalty:
        fields["presence_penalty"] = request.presence_penalty
    if request.frequency_penalty:
        fields["frequency_penalty"] = request.frequency_penalty
    if request.random is not None:
        fields["random"] = request.random
    return fields


def differences(got: dict, wanted: dict) -> list[str]:
    """The fields (other than the prompt) where a results file's request differs from HELM's."""
    out = []
    for key in sorted(set(got) | set(wanted)):
        if key == "prompt":
            continue
        if got.get(key, "<absent>") != wanted.get(key, "<absent>"):
            out.append(f"{key}={got.get(key, '<absent>')!r} where HELM asks {wanted.get(key, '<absent>')!r}")
    return out


def snippet(prompt: str, width: int = 60) -> str:
    text = prompt if len(prompt) <= width else prompt[:width] + "..."
    return repr(text)
