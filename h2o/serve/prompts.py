"""HELM prompts to token ids, as a served run reads them: raw, or in the tokenizer's chat template."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase, PretrainedConfig

from h2o import models
from h2o.serve import helm_io
from h2o.serve.options import ServeOptions


@dataclass(frozen=True)
class Encoded:
    """A request to serve: its index in the writer's requests, the request, its prompt's token
    ids, and whether the chat template wrapped it."""

    index: int
    request: helm_io.Request
    ids: list[int]
    templated: bool


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, mode: str) -> tuple[list[int], bool]:
    """Token ids for a prompt, and whether the chat template wrapped it (`mode`: --chat_template).
    Raw prompts get no special tokens, as in the paper."""
    templated = mode == "on" or (mode == "auto" and bool(tokenizer.chat_template))
    if templated:
        if not tokenizer.chat_template:
            raise ValueError("--chat_template on: this tokenizer has no chat template")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return tokenizer(prompt, add_special_tokens=False).input_ids, templated


def encode_all(options: ServeOptions, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig,
               requests: list[tuple[int, helm_io.Request]]) -> list[Encoded]:
    """Each request's token ids; a prompt too long for the model is refused, named by its line."""
    context = getattr(config, "max_position_embeddings", None)
    window = models.attention_window(config)
    encoded = []
    for index, request in requests:
        ids, templated = encode(tokenizer, request.prompt, options.chat_template)
        where = f"{options.input_path}:{request.line}"
        if not ids:
            raise ValueError(f"{where}: the prompt encodes to no tokens")
        if context and len(ids) + request.max_tokens > context:
            raise ValueError(
                f"{where}: prompt of {len(ids)} tokens + max_tokens {request.max_tokens} exceeds the model's "
                f"context of {context}"
            )
        if window and len(ids) + request.max_tokens > window:
            # The caches attend over every slot they hold: a sliding window is not applied.
            raise ValueError(
                f"{where}: prompt of {len(ids)} tokens + max_tokens {request.max_tokens} exceeds the model's "
                f"sliding attention window of {window}, which the lab does not apply"
            )
        encoded.append(Encoded(index, request, ids, templated))
    return encoded
