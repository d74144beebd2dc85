"""An independent re-statement of the paper's lm-eval masking (FMInference/H2O,
h2o_hf/utils_lm_eval/modify_llama.py, "Heavy Hitter Mask (Based on global statistics)") as an
attention function, for batch size 1 and multi-head models, used only to check mask mode
against it, and of its `run_lm_eval_harness.py` scoring: one forward over the whole text,
log_softmax, each token's log-probability read from the position before it.

Same operations in the same order: causal weights clamped at the dtype's minimum, budgets
`int(ratio * keys)`, the softmax summed over query rows, the top `heavy` columns, a band of
`recent` on either side, every other weight set to the minimum, softmax again.
"""

from __future__ import annotations

import math

import torch
from transformers import AttentionInterface

RATIOS: dict[str, float] = {}


def paper_lm_eval_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    q_len, kv_len = query.shape[2], key.shape[2]
    weights = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(query.shape[-1])
    minimum = torch.tensor(torch.finfo(weights.dtype).min)
    causal = torch.full((q_len, kv_len), minimum.item()).triu(1)
    weights = torch.max(weights + causal, minimum)

    heavy = int(RATIOS["heavy"] * weights.shape[-1])
    recent = int(RATIOS["recent"] * weights.shape[-1])
    summed = torch.softmax(weights, dim=-1, dtype=torch.float32).to(weights.dtype).sum(dim=-2)
    top = summed.topk(k=heavy, dim=-1).indices
    keep = torch.zeros_like(summed, dtype=torch.bool).scatter(-1, top, True).unsqueeze(2)
    keep = keep.expand(keep.shape[0], keep.shape[1], q_len, kv_len)
    band = torch.ones_like(weights, dtype=torch.bool)
    band = torch.triu(torch.tril(band, diagonal=recent), diagonal=-recent)
    weights[~(keep | band)] = minimum

    probs = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


AttentionInterface.register("paper_lm_eval", paper_lm_eval_attention)


@torch.inference_mode()
def paper_token_logprobs(model, text: list[int], heavy_ratio: float | None = None,
                         recent_ratio: float | None = None) -> list[float]:
    """The paper's `token_logprobs` for one text, less its leading None: the full model when the
    ratios are None, else the masked one."""
    if heavy_ratio is None:
        model.set_attn_implementation("eager")
    else:
        RATIOS.update(heavy=heavy_ratio, recent=recent_ratio)
        model.set_attn_implementation("paper_lm_eval")
    ids = torch.tensor([text])
    logits = model(input_ids=ids).logits.log_softmax(dim=-1)
    return torch.gather(logits[:, :-1], -1, ids[:, 1:].unsqueeze(-1))[0, :, 0].tolist()
