"""The prompt-scoring kernels keep float32's precision where a GPU would give them TF32.

On a GPU, `tl.dot` of float32 operands defaults to TF32 (10 mantissa bits), while the reference
engine's float32 matmul keeps all 23: prefill scores off by 1e-3, enough to reorder close heavy
hitters (the tiny OPT below leaves the reference's tokens at its 8th). Triton's interpreter
multiplies exactly whatever a dot asks for, so the child process here first teaches it the
truncation (tests/tf32_interpreter.py) and checks that the lesson took.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import random_prompts, tiny_tokenizer

if importlib.util.find_spec("triton") is None:
    pytest.skip("needs Triton (requirements.txt installs it)", allow_module_level=True)

from h2o.engine.reference.generation import Eviction, Sampling, generate  # noqa: E402
from h2o.policies import make_policy  # noqa: E402
from test_kernels_interpreted import _interpreted, _prefill_inputs, _prefill_reference  # noqa: E402
from tiny_families import tiny_opt  # noqa: E402

_CHILD = """
import sys
import torch
sys.path.insert(0, "tests")
import tf32_interpreter
tf32_interpreter.install()
from conftest import tiny_tokenizer
from tiny_families import tiny_opt
from h2o.engine.fast import FastEngine, kernels
from h2o.engine.reference.generation import Sampling
from h2o.policies import make_policy
assert kernels.available(torch.device("cpu")), "Triton's interpreter is off"
work = torch.load(sys.argv[1])
probe = tf32_interpreter.probe(*work["probe"])
scores = [kernels.prefill_scores(*args, **options) for args, options in work["prefill"]]
model = tiny_opt(head_dim=work["head_dim"])
model.load_state_dict(work["weights"])
engine = FastEngine(model, tiny_tokenizer(), make_policy("h2o", *work["ratios"]), 2, use_kernels=True)
done = engine.run(work["prompts"], [Sampling(max_new_tokens=n) for n in work["new_tokens"]])
torch.save(dict(probe=probe, scores=scores, tokens=[c.token_ids for c in done],
                used_kernels=engine.cache.use_kernels), sys.argv[2])
"""

PREFILL_CASES = [(groups, shape) for groups in (1, 3) for shape in ("n37-blocks16-left-padded", "n70-default-blocks")]
HEAD_DIM = 32  # OPT with heads the kernels take
RATIOS = (0.1, 0.1)
# A 77-token prompt whose 21 tokens, under TF32 prompt scores, leave the reference's at the 8th.
PROMPTS = random_prompts([64, 101, 64, 90, 77], seed=5)[4:]
NEW_TOKENS = [21]


@pytest.fixture(scope="module")
def opt():
    return tiny_opt(head_dim=HEAD_DIM)


@pytest.fixture(scope="module")
def child(opt, tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    probe = tuple(torch.randn(16, 16, generator=g) for _ in range(2))
    prefill = [_prefill_inputs("float32", groups, 64, shape, seed=i) for i, (groups, shape) in enumerate(PREFILL_CASES)]
    work = dict(probe=probe, prefill=prefill, head_dim=HEAD_DIM, weights=opt.state_dict(), ratios=RATIOS,
                prompts=PROMPTS, new_tokens=NEW_TOKENS)
    return work, _interpreted(_CHILD, work, tmp_path_factory.mktemp("tf32"))


def test_the_interpreter_truncates_float32_dots_as_tensor_cores_do(child):
    # Guards the tests below: without the lesson they would pass whatever the kernels ask for.
    work, got = child
    a, b = work["probe"]
    default, ieee = got["probe"]
    torch.testing.assert_close(ieee, a @ b, rtol=1e-5, atol=1e-5)
    truncated = [(x.view(torch.int32) & -(1 << 13)).view(torch.float32) for x in (a, b)]
    torch.testing.assert_close(default, truncated[0] @ truncated[1], rtol=1e-5, atol=1e-5)
    assert (default - a @ b).abs().max() > 1e-3


@pytest.mark.parametrize("case", range(len(PREFILL_CASES)), ids=[f"{g}q-per-kv-{s}" for g, s in PREFILL_CASES])
def test_prefill_scores_of_float32_keep_float32_precision(child, case):
    work, got = child
    args, options = work["prefill"][case]
    torch.testing.assert_close(got["scores"][case], _prefill_reference(*args, starts=options.get("starts")),
                               atol=1e-4, rtol=1e-4)


def test_the_fast_engine_with_kernels_gives_the_reference_tokens_on_opt(opt, child):
    # OPT scales its query before the projection leaves it and passes scaling 1.0: the kernels'
    # products are its logits as they are, so they must be float32's.
    _, got = child
    assert got["used_kernels"]
    reference = generate(opt, tiny_tokenizer(), PROMPTS, [Sampling(max_new_tokens=n) for n in NEW_TOKENS],
                         Eviction(make_policy("h2o", *RATIOS), "drop"))
    assert got["tokens"] == [c.token_ids for c in reference]
