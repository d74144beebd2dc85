"""The needle task: RULER's single-needle retrieval (Hsieh et al., 2024, "RULER: What's the Real
Context Size of Your Long-Context Language Models?", task niah_single_1), generated from a seed.

A haystack of RULER's noise sentences hides one sentence, "One of the special magic numbers for
<key> is: <value>.", at a depth (0% is the first sentence, 100% the last), and the prompt asks
for the key's number. A request of length L (1k to 8k tokens) is the prompt, a chat template's
room and the answer: the haystack is as long as that allows. Scored by exact recall: whether the
answer holds the 7-digit value (RULER's string match).

The examples (key, value, depth, length) need no tokenizer; the prompts are sized with the lab's
HELM tokenizer, in the HELM scenario.

`needle_essay` is RULER's essay variant (niah_single_2): the same needles (key, value, depth and
length, example for example), hidden in natural prose instead of the repeated noise. RULER's
haystack is Paul Graham's essays; here it is the lab's own XSUM articles (data/xsum/), in file
order, cut into sentences and read from the first, so that nothing is downloaded. The needle goes
between two sentences at the example's depth, as RULER inserts it.
"""

from __future__ import annotations

import json
import random
import re
from functools import cache

from lab_helm.lengths import prompt_budget
from lab_helm.paths import DATA

LENGTHS = (1024, 2048, 4096, 8192)
DEPTHS = (0, 25, 50, 75, 100)  # percent of the haystack before the needle
SAMPLES = 5  # per (length, depth) cell
SEED = 0
MAX_TOKENS = 64  # the answer is one sentence, about 25 tokens

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic numbers for {key} is: {value}."
TEMPLATE = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the numbers afterwards.\n{context}\n"
            "What is the special magic number for {key} mentioned in the provided text?")
# Keys are adjective-noun pairs, as RULER's.
ADJECTIVES = ("ancient", "brave", "calm", "damp", "eager", "faint", "gentle", "hollow", "icy", "jolly",
              "keen", "lively", "mellow", "narrow", "odd", "proud", "quiet", "rapid", "silent", "tidy",
              "upbeat", "vivid", "wary", "young")
NOUNS = ("anchor", "badger", "canyon", "dragon", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tunnel",
         "umbrella", "violin", "walrus", "yacht")


# A sentence ends at ., ! or ? (a closing quote may follow) before white space.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'])\s+")
ESSAY_SOURCE = DATA / "xsum" / "xsum_test_500.jsonl"


def examples(seed: int = SEED) -> list[dict]:
    """One example per sample, length and depth, in that nesting: any first 20 cover the grid once."""
    rng = random.Random(seed)
    out = []
    for sample in range(SAMPLES):
        for length in LENGTHS:
            for depth in DEPTHS:
                out.append({
                    "id": f"needle-{length}-{depth:03d}-{sample}",
                    "length": length,
                    "depth": depth,
                    "key": f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}",
                    "value": str(rng.randrange(1_000_000, 10_000_000)),
                })
    return out


def text(example: dict, sentences: int) -> str:
    """The prompt with `sentences` noise sentences, the needle among them at the example's depth."""
    haystack = [NOISE] * sentences
    haystack.insert(round(sentences * example["depth"] / 100), NEEDLE.format(**example))
    return TEMPLATE.format(context=" ".join(haystack), key=example["key"])


def prompt(example: dict, tokenizer) -> str:
    """The longest prompt whose request fits the example's length."""
    budget = prompt_budget(example["length"], MAX_TOKENS)

    def count(sentences: int) -> int:
        return len(tokenizer.encode(text(example, sentences), add_special_tokens=False))

    # Noise tokenizes the same sentence after sentence: a linear guess, then a step or two.
    empty, per = count(0), count(1) - count(0)
    sentences = max(0, (budget - empty) // per)
    while sentences > 0 and count(sentences) > budget:
        sentences -= 1
    while count(sentences + 1) <= budget:
        sentences += 1
    if count(sentences) > budget:
        raise ValueError(f"needle {example['id']}: even an empty haystack exceeds {budget} tokens")
    return text(example, sentences)


def essay_examples(seed: int = SEED) -> list[dict]:
    """`examples` hidden in prose: the same needles, ids `needle_essay-...`."""
    return [{**e, "id": e["id"].replace("needle-", "needle_essay-", 1)} for e in examples(seed)]


@cache
def essay_sentences() -> tuple[str, ...]:
    """The XSUM articles' sentences, article after article, each article's white space collapsed."""
    sentences = []
    with open(ESSAY_SOURCE, encoding="utf-8") as f:
        for line in f:
            document = " ".join(json.loads(line)["document"].split())
            sentences.extend(part for part in SENTENCE_END.split(document) if part)
    return tuple(sentences)


def essay_text(example: dict, sentences: int) -> str:
    """The prompt with the first `sentences` prose sentences, the needle among them at the depth."""
    haystack = list(essay_sentences()[:sentences])
    haystack.insert(round(sentences * example["depth"] / 100), NEEDLE.format(**example))
    return TEMPLATE.format(context=" ".join(haystack), key=example["key"])


def essay_prompt(example: dict, tokenizer) -> str:
    """The longest prose prompt whose request fits the example's length: prose tokenizes unevenly,
    so the count of sentences is searched (more sentences never take fewer tokens)."""
    budget = prompt_budget(example["length"], MAX_TOKENS)

    def fits(sentences: int) -> bool:
        return len(tokenizer.encode(essay_text(example, sentences), add_special_tokens=False)) <= budget

    if not fits(0):
        raise ValueError(f"needle {example['id']}: even an empty haystack exceeds {budget} tokens")
    low, high = 0, len(essay_sentences())  # fits(low); high may
    if fits(high):
        raise ValueError(f"needle {example['id']}: the {high} sentences of {ESSAY_SOURCE.name} are too few")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return essay_text(example, low)
