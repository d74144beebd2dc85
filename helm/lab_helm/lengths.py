"""How long a request of the long-input tasks may be, in tokens of the lab's HELM tokenizer (SmolLM2's).

A request is its prompt, the chat template run_helm.py wraps it in, and the tokens to generate.
The prompts are cut or sized here, before HELM, for one context: HELM would otherwise cut them
from the right, dropping the question, and run_helm.py counts the chat template that HELM never
sees. SmolLM2's template adds 30 tokens; CHAT_ROOM leaves room for a longer one.
"""

CONTEXT = 8192  # SmolLM2-135M-Instruct's max_position_embeddings
CHAT_ROOM = 64


def prompt_budget(request_tokens: int, max_tokens: int) -> int:
    """The most tokens a bare prompt may have so that, templated, it and its answer fit `request_tokens`."""
    return request_tokens - max_tokens - CHAT_ROOM
