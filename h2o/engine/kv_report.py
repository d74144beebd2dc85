"""What a completion says of its KV cache (`Completion.kv_cache`), the same record from both engines."""

from __future__ import annotations

from transformers import PretrainedConfig, PreTrainedModel

from h2o.policies import Budget, Policy


def kv_heads_and_size(config: PretrainedConfig) -> tuple[int, int]:
    """A layer's KV heads and their head size."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads  # OPT, GPT-NeoX: none
    return kv_heads, head_dim


def kv_bytes_per_token(model: PreTrainedModel) -> int:
    """Bytes of one token's keys and values over all layers and KV heads."""
    kv_heads, head_dim = kv_heads_and_size(model.config)
    return model.config.num_hidden_layers * kv_heads * 2 * head_dim * model.dtype.itemsize


def kv_report(
    engine: str,
    model: PreTrainedModel,
    prompt_tokens: int,
    generated: int,
    *,
    policy: Policy | None = None,
    mode: str = "drop",
    budget: Budget | None = None,
    peak_bytes: int = 0,
) -> dict:
    """One request's record: which engine, policy (None: the full cache) and KV mode, the ratios
    and the sequence's budget, its prompt's length, and the KV bytes it held at its peak
    (`peak_bytes`, as the engine measured it) against what a full cache would have held."""
    # The last token's key and value are never written: a full cache peaks one short of the end.
    full = (prompt_tokens + max(0, generated - 1)) * kv_bytes_per_token(model)
    if policy is None:
        return {"engine": engine, "policy": "full", "mode": "full", "prompt_tokens": prompt_tokens,
                "kv_bytes_peak": full, "kv_bytes_full": full}
    return {
        "engine": engine,
        "policy": policy.name,
        "mode": mode,
        "heavy_ratio": policy.heavy_ratio,
        "recent_ratio": policy.recent_ratio,
        "heavy_budget": budget.heavy,
        "recent_budget": budget.recent,
        "prompt_tokens": prompt_tokens,
        "kv_bytes_peak": peak_bytes,
        "kv_bytes_full": full,
    }
