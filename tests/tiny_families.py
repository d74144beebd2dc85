"""Tiny random OPT and GPT-NeoX models (the paper's other two families), built from their
transformers configs: multi-head, three layers, 24-dimensional heads by default (head_dim**-0.5
is not a power of two, so where the scaling happens shows in the last bits; the Triton kernels
need 16, 32, 64...), with weights scaled up from
the init so that attention is sharp and eviction choices are not near-ties."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, OPTConfig, OPTForCausalLM

from conftest import VOCAB, tiny_tokenizer

HEADS, HEAD_DIM, LAYERS = 4, 24, 3


def tiny_opt(seed: int = 0, context: int = 256, vocab: int = VOCAB, head_dim: int = HEAD_DIM) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=vocab, hidden_size=HEADS * head_dim, ffn_dim=128, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=context, word_embed_proj_dim=HEADS * head_dim,
        dropout=0.0, tie_word_embeddings=False, eos_token_id=1, pad_token_id=0, bos_token_id=0,
    )
    model = OPTForCausalLM(config).eval()
    with torch.no_grad():
        decoder = model.model.decoder
        decoder.embed_tokens.weight.mul_(25.0)  # the init's 0.02: tokens would drown in the positions
        decoder.embed_positions.weight.mul_(10.0)
        for layer in decoder.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                projection.weight.mul_(15.0)
            for linear in (layer.self_attn.v_proj, layer.self_attn.out_proj, layer.fc1, layer.fc2):
                linear.weight.mul_(10.0)
        model.lm_head.weight.mul_(100.0)
        model.lm_head.weight[1] = 0.0  # no end of text: each request runs to its max_tokens
    model.generation_config.eos_token_id = None
    return model


def tiny_gpt_neox(seed: int = 0, context: int = 256, vocab: int = VOCAB,
                  head_dim: int = HEAD_DIM) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=vocab, hidden_size=HEADS * head_dim, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=context, rotary_pct=0.25,
        use_parallel_residual=True, tie_word_embeddings=False, eos_token_id=1, pad_token_id=0, bos_token_id=0,
    )
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        model.gpt_neox.embed_in.weight.mul_(25.0)
        for layer in model.gpt_neox.layers:
            hidden = config.hidden_size
            qkv = layer.attention.query_key_value.weight.view(HEADS, 3, head_dim, hidden)
            qkv[:, :2].mul_(15.0)  # queries and keys
            qkv[:, 2].mul_(10.0)
            for linear in (layer.attention.dense, layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h):
                linear.weight.mul_(10.0)
        model.lm_head.weight.mul_(100.0)
        model.lm_head.weight[1] = 0.0
    model.generation_config.eos_token_id = None
    return model


FAMILIES = {"opt": tiny_opt, "gpt_neox": tiny_gpt_neox}


def save_tiny(arch: str, folder: Path, context: int = 256) -> Path:
    """A tiny model of `arch` and the word-level tokenizer, saved as a checkpoint folder."""
    FAMILIES[arch](context=context).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
