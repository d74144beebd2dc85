"""LongBench's MultiNews prompt (Bai et al., 2023): its template, and its cut of a prompt too long
for the model, in the middle, keeping the first and the last halves (the instructions sit at both
ends).

The cut is made in the HELM scenario, at export, rather than in run_helm.py: the requests file
then holds the very prompt the model reads, HELM shows and scores that prompt, and run_helm.py
stays free of any task's rules.
"""

from __future__ import annotations

from lab_helm.lengths import CONTEXT, prompt_budget

MAX_TOKENS = 512  # LongBench's maximum new tokens for multi_news
PROMPT_TOKENS = prompt_budget(CONTEXT, MAX_TOKENS)
# LongBench's dataset2prompt.json entry, space before the blank line included.
TEMPLATE = ("You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
            "Now, write a one-page summary of all the news.\n\nSummary:")


def prompt(context: str, tokenizer, max_tokens: int = PROMPT_TOKENS) -> str:
    """The template around `context`, cut as LongBench's pred.py cuts it when longer than
    `max_tokens`: the first and last `max_tokens // 2` tokens, each decoded, joined."""
    text = TEMPLATE.format(context=context)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text
    half = max_tokens // 2
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[-half:], skip_special_tokens=True))
