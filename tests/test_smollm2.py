"""The embedded SmolLM2-135M-Instruct (GQA: 9 query heads, 3 KV heads) and its multi-head twin."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ROOT
from h2o import models
from h2o.engine.reference.generation import Eviction, Sampling, generate
from h2o.policies import make_policy
from h2o.serve.prompts import encode
from paper_reference import paper_greedy

NEW_TOKENS = 20


@pytest.fixture(scope="module")
def smollm2():
    tokenizer, _ = models.load_tokenizer()
    return models.load_model(), tokenizer


@pytest.fixture(scope="module")
def twin(smollm2):
    """The same function as a multi-head model: each KV head's projection rows repeated for the
    query heads that share it."""
    model, _ = smollm2
    config = model.config.__class__.from_dict(model.config.to_dict())
    groups = config.num_attention_heads // config.num_key_value_heads
    config.num_key_value_heads = config.num_attention_heads
    mha = AutoModelForCausalLM.from_config(config).eval()
    state = model.state_dict()
    head_dim = config.hidden_size // config.num_attention_heads
    for name, tensor in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            rows = tensor.view(-1, head_dim, tensor.shape[-1]).repeat_interleave(groups, dim=0)
            state[name] = rows.reshape(-1, tensor.shape[-1])
    mha.load_state_dict(state)
    mha.generation_config.eos_token_id = None
    return mha


@pytest.fixture(scope="module")
def prompts(smollm2):
    _, tokenizer = smollm2
    lines = (ROOT / "data" / "xsum.jsonl").read_text().splitlines()[:3]
    texts = [json.loads(line)["request"]["prompt"] for line in lines]
    return [encode(tokenizer, t, "on")[0] for t in texts]  # templated: real summaries, not stubs


def test_the_twin_is_the_same_function(smollm2, twin, prompts):
    model, _ = smollm2
    ids = torch.tensor([prompts[1][:64]])
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ratios", [(0.1, 0.1), (0.0, 0.2)])
def test_twin_mask_mode_matches_the_paper_and_drop_matches_mask(smollm2, twin, prompts, ratios):
    _, tokenizer = smollm2
    sampling = [Sampling(max_new_tokens=NEW_TOKENS)]
    compared = 0
    for prompt in prompts[:2]:
        paper = paper_greedy(twin, prompt, NEW_TOKENS, *ratios)
        if tokenizer.eos_token_id in paper:  # we stop at the end of text; the paper's loop runs on
            paper = paper[: paper.index(tokenizer.eos_token_id)]
        mask = generate(twin, tokenizer, [prompt], sampling, Eviction(make_policy("h2o", *ratios), "mask"))
        drop = generate(twin, tokenizer, [prompt], sampling, Eviction(make_policy("h2o", *ratios), "drop"))
        assert mask[0].token_ids == paper
        assert drop[0].token_ids == paper
        compared += len(paper)
    assert compared >= NEW_TOKENS  # not a vacuous match on empty continuations


def test_gqa_drop_matches_mask_in_a_batch(smollm2, prompts):
    model, tokenizer = smollm2
    sampling = [Sampling(max_new_tokens=NEW_TOKENS)] * len(prompts)
    policy = make_policy("h2o", 0.1, 0.1)
    drop = generate(model, tokenizer, prompts, sampling, Eviction(policy, "drop"))
    mask = generate(model, tokenizer, prompts, sampling, Eviction(policy, "mask"))
    single = [generate(model, tokenizer, [p], sampling[:1], Eviction(policy, "drop"))[0] for p in prompts]
    assert [c.token_ids for c in drop] == [c.token_ids for c in mask] == [c.token_ids for c in single]
    for completion, prompt in zip(drop, prompts):
        report = completion.kv_cache
        assert report["heavy_budget"] == int(0.1 * len(prompt))
        assert report["kv_bytes_peak"] < 0.35 * report["kv_bytes_full"]
