"""The loss analysis: the summary's attention on the prompt, and how much of it a policy keeps."""

import pytest
import torch

from conftest import random_prompts
from h2o.lab.analysis import (
    deciles, h2o_kept, kept_after_prompt, oracle, prompt_attention_by_head, recall, summary_attention,
)
from h2o.engine.reference.generation import Sampling, generate
from h2o.lab.points import Point


def _summary(model, tokenizer, prompt):
    return generate(model, tokenizer, [prompt], [Sampling(max_new_tokens=12)])[0].token_ids


def test_summary_attention_is_what_the_summary_rows_of_eager_attention_put_on_the_prompt(gqa, tokenizer):
    prompt = random_prompts([50], seed=31)[0]
    summary = _summary(gqa, tokenizer, prompt)
    mass = summary_attention(gqa, prompt, summary)
    gqa.set_attn_implementation("eager")
    with torch.inference_mode():
        out = gqa(input_ids=torch.tensor([prompt + summary[:-1]]), output_attentions=True)
    groups = gqa.config.num_attention_heads // gqa.config.num_key_value_heads
    direct = torch.stack([
        a[0, :, len(prompt):, : len(prompt)].sum(1).view(-1, groups, len(prompt)).sum(1) for a in out.attentions
    ])
    assert mass.shape == (gqa.config.num_hidden_layers, gqa.config.num_key_value_heads, len(prompt))
    assert torch.allclose(mass, direct, atol=1e-4)


def test_recall_is_one_with_room_for_the_prompt_and_never_above_the_oracle(gqa, tokenizer):
    prompt = random_prompts([80], seed=32)[0]
    mass = summary_attention(gqa, prompt, _summary(gqa, tokenizer, prompt))
    everything = kept_after_prompt(gqa, prompt, Point("h2o", 1.0))
    assert everything.all() and torch.allclose(recall(mass, everything), torch.ones(2))
    recalls = {}
    for policy in ("h2o", "local", "tova"):
        kept = kept_after_prompt(gqa, prompt, Point(policy, 0.2))
        assert int(kept.sum(-1).max()) < len(prompt)
        ceiling = recall(mass, oracle(mass, int(kept.sum(-1).max())))
        recalls[policy] = recall(mass, kept)
        assert (recalls[policy] <= ceiling + 1e-6).all() and (recalls[policy] < 1).all()
    assert len({round(float(r.mean()), 6) for r in recalls.values()}) == 3  # each keeps its own tokens


def test_the_recent_window_keeps_the_last_tenth_and_deciles_sum_to_one():
    kept = torch.zeros(1, 1, 100, dtype=torch.bool)
    kept[..., 95:] = True
    shares = deciles(kept)
    assert shares[-1] == pytest.approx(1.0) and sum(shares) == pytest.approx(1.0)


def test_the_gqa_what_if_with_the_sum_is_h2o_itself_and_the_max_keeps_as_many(gqa):
    prompt = random_prompts([90], seed=33)[0]
    per_head = prompt_attention_by_head(gqa, prompt)
    assert per_head.shape == (2, 4, 90)
    assert torch.allclose(per_head.sum(-1), torch.full((2, 4), 90.0))  # 90 rows, each summing to 1
    summed = h2o_kept(per_head, 2, 0.2, "sum")
    assert torch.equal(summed, kept_after_prompt(gqa, prompt, Point("h2o", 0.2)))
    maxed = h2o_kept(per_head, 2, 0.2, "max")
    assert torch.equal(maxed.sum(-1), summed.sum(-1)) and not torch.equal(maxed, summed)
