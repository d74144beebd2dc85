"""Model parallel check on 2+ GPUs: a model split across GPUs by a device map gives the same greedy
tokens under H2O drop mode as the same model on one GPU, with each layer's cache on its layer's GPU.

    python benchmarks/device_map_check.py
"""

from __future__ import annotations

import json
import tempfile

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from h2o.engine.reference.generation import Eviction, Sampling, generate
from h2o.policies import make_policy


def main() -> int:
    vocab = 1000
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0")),
        pad_token="w0",
    )
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=2048)
    torch.manual_seed(0)
    folder = tempfile.mkdtemp()
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(folder)
    one = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float16).to("cuda:0").eval()
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
             "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    two = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float16, device_map=split).eval()
    for model in (one, two):
        model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (300, 517, 411)]
    sampling = [Sampling(max_new_tokens=32)] * len(prompts)
    eviction = Eviction(make_policy("h2o", 0.1, 0.1), "drop")
    a = generate(one, tokenizer, prompts, sampling, eviction)
    b = generate(two, tokenizer, prompts, sampling, eviction)
    print(json.dumps({
        "card": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(),
        "layer_devices": sorted({str(p.device) for p in two.parameters()}),
        "same_tokens": [x.token_ids == y.token_ids for x, y in zip(a, b)],
        "kv_bytes_peak": [y.kv_cache["kv_bytes_peak"] for y in b],
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
