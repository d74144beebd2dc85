"""The paper's other families, OPT and GPT-NeoX, on tiny random models (tests/tiny_families.py):
mask mode gives the paper's greedy tokens (restated in paper_reference_opt.py and
paper_reference_gptneox.py), drop mode gives mask mode's, the fast engine the reference engine's
and a batch what each prompt gets alone, for the full cache and every policy; then run_helm.py
with --model_arch opt / gpt_neox on saved folders, --device_map auto included, and the paper's
scripts/helm/h2o.sh then HELM's our_run.sh (offline) on each family's results."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache

from conftest import ROOT, child_env, random_prompts, tiny_tokenizer
from h2o.engine.fast import FastEngine, generate_fast
from h2o.engine.reference.generation import Decoder, Eviction, Sampling, generate
from h2o.policies import make_policy
from h2o.serve.cli import main
from lab_helm.tasks import model_archs
from paper_reference_gptneox import paper_greedy_gptneox
from paper_reference_opt import paper_greedy_opt
from tiny_families import FAMILIES, save_tiny

PAPER = {"opt": paper_greedy_opt, "gpt_neox": paper_greedy_gptneox}
RATIOS = [(0.1, 0.1), (0.2, 0.1), (0.0, 0.2), (0.3, 0.05)]
NEW = 24


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, FAMILIES[request.param]()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@torch.inference_mode()
def _transformers_greedy(model, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    model.set_attn_implementation("eager")
    cache, ids, tokens, logits = DynamicCache(config=model.config), torch.tensor([prompt]), [], []
    for _ in range(NEW):
        logits.append(model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1])
        tokens.append(int(logits[-1].argmax()))
        ids = torch.tensor([tokens[-1:]])
    return tokens, logits


def test_the_restatement_is_the_transformers_model(family):
    # Its own forward pass (learned positions / partial rotary, residuals, norms) with a full
    # cache gives transformers' greedy tokens: what it adds on top is the paper's H2O alone.
    arch, model = family
    for prompt in random_prompts([57, 90], seed=3):
        paper_tokens, paper_logits = PAPER[arch](model, prompt, NEW, None, None)
        tokens, logits = _transformers_greedy(model, prompt)
        assert paper_tokens == tokens
        for a, b in zip(paper_logits, logits):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


@torch.inference_mode()
def _mask_logits(model, prompt: list[int], tokens: list[int], ratios) -> list[torch.Tensor]:
    decoder = Decoder(model, [prompt], Eviction(make_policy("h2o", *ratios), "mask"))
    logits = [decoder.prefill()[0]]
    for token in tokens[:-1]:
        logits.append(decoder.step(torch.tensor([token]))[0])
    return logits


@pytest.mark.parametrize("ratios", RATIOS)
def test_mask_mode_reproduces_the_papers_tokens(family, tokenizer, ratios):
    arch, model = family
    for prompt in random_prompts([57, 90], seed=3):
        expected, paper_logits = PAPER[arch](model, prompt, NEW, *ratios)
        out = generate(model, tokenizer, [prompt], [Sampling(max_new_tokens=NEW)],
                       Eviction(make_policy("h2o", *ratios), "mask"))
        assert out[0].token_ids == expected
        # Every decode step's logits are the paper's to the bit: same scaling (OPT's query before
        # q.k, GPT-NeoX's baddbmm), masks and softmax. (The prefill's lm_head runs on the last
        # row alone here, on every row there: a different product, equal to rounding.)
        logits = _mask_logits(model, prompt, expected, ratios)
        torch.testing.assert_close(logits[0], paper_logits[0], rtol=0, atol=1e-4)
        for step, (ours, paper) in enumerate(zip(logits[1:], paper_logits[1:]), 1):
            assert torch.equal(ours, paper), f"step {step}"


def test_eviction_changes_the_output(family, tokenizer):
    # Guards the tests above and below: on these models a small cache must make a difference.
    _, model = family
    prompts = random_prompts([57, 90], seed=3)
    full = [c.token_ids for c in generate(model, tokenizer, prompts, [Sampling(max_new_tokens=NEW)] * 2)]
    for ratios in ((0.1, 0.1), (0.0, 0.2)):
        small = generate(model, tokenizer, prompts, [Sampling(max_new_tokens=NEW)] * 2,
                         Eviction(make_policy("h2o", *ratios), "mask"))
        assert all(a.token_ids != b for a, b in zip(small, full))


POLICIES = {"h2o": ("h2o", 0.1, 0.1), "local": ("h2o", 0.0, 0.2), "h2o-avg": ("h2o-avg", 0.1, 0.1),
            "h2o-sink": ("h2o-sink", 0.1, 0.1), "sink": ("sink", 0.1, 0.1), "tova": ("tova", 0.1, 0.1),
            "a2sf": ("a2sf", 0.1, 0.1), "keydiff": ("keydiff", 0.1, 0.1), "h2o-vnorm": ("h2o-vnorm", 0.1, 0.1),
            "expected-attention": ("expected-attention", 0.1, 0.1), "h2o-keydiff": ("h2o-keydiff", 0.1, 0.1)}
# At least 40 tokens: h2o-sink with a heavy budget below its 4 sinks keeps an arbitrary few of
# them (tied ranks), which a batch may choose differently (every architecture, LLaMA too).
LENGTHS = [45, 80, 51]


def _texts(completions):
    return [c.token_ids for c in completions]


@pytest.mark.parametrize("name", ["full", *POLICIES])
def test_drop_is_mask_fast_is_reference_a_batch_is_one_at_a_time(family, tokenizer, name):
    _, model = family
    prompts = random_prompts(LENGTHS, seed=7)
    sampling = [Sampling(max_new_tokens=n) for n in (16, 9, 12)]
    policy = None if name == "full" else make_policy(*POLICIES[name])
    modes = ["full"] if policy is None else ["drop", "mask"]
    runs = {}
    for mode in modes:
        eviction = None if policy is None else Eviction(policy, mode)
        runs[mode] = generate(model, tokenizer, prompts, sampling, eviction)
        singles = [generate(model, tokenizer, [p], [s], eviction)[0] for p, s in zip(prompts, sampling)]
        assert _texts(singles) == _texts(runs[mode]), mode
    reference = runs[modes[0]]
    assert all(_texts(runs[m]) == _texts(reference) for m in modes)
    for rows in (1, 3):
        fast = FastEngine(model, tokenizer, policy, rows, steps_per_check=4).run(prompts, sampling)
        assert _texts(fast) == _texts(reference), rows
        for a, b in zip(fast, reference):
            assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
    if policy is not None:
        greedy = generate_fast(model, prompts, 16, policy, prefill_rows=2).token_ids
        assert [g[: s.max_new_tokens] for g, s in zip(greedy, sampling)] == _texts(reference)


# run_helm.py on saved folders.

@pytest.fixture(scope="module", params=list(FAMILIES))
def model_dir(request, tmp_path_factory):
    arch = request.param
    return arch, save_tiny(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))


REQUEST_LENGTHS = [70, 31, 95, 44, 58]
MAX_TOKENS = [12, 5, 16, 9, 14]
SMALL = ["--enable_small_cache", "--heavy_ratio", "0.1", "--recent_ratio", "0.1"]


def _requests(path):
    lines = []
    for prompt, max_tokens in zip(random_prompts(REQUEST_LENGTHS, seed=60), MAX_TOKENS):
        request = {"prompt": " ".join(f"w{t - 2}" for t in prompt), "temperature": 0.0, "max_tokens": max_tokens,
                   "stop": ["###"], "top_p": 1, "n": 1}
        lines.append(json.dumps({"request": request}) + "\n")
    path.write_text("".join(lines))
    return path


def _run(model_dir, inp, out, *flags) -> list[dict]:
    arch, folder = model_dir
    assert main(["--input_path", str(inp), "--output_path", str(out), "--model_name", str(folder),
                 "--model_arch", arch, "--no_cuda", *flags]) == 0
    return [json.loads(line)["result"] for line in out.read_text().splitlines()]


def _choices(results: list[dict]) -> list[tuple]:
    return [(r["choices"][0]["text"], r["choices"][0]["logprobs"]["tokens"]) for r in results]


def test_run_helm_with_model_arch(model_dir, tmp_path):
    inp = _requests(tmp_path / "in.jsonl")
    runs = {
        "full": _run(model_dir, inp, tmp_path / "full.jsonl", "--batch_size", "3", "--engine", "reference"),
        "full_fast": _run(model_dir, inp, tmp_path / "full_fast.jsonl", "--batch_size", "3"),
        "mask": _run(model_dir, inp, tmp_path / "mask.jsonl", "--batch_size", "3", *SMALL, "--kv_mode", "mask"),
        "drop": _run(model_dir, inp, tmp_path / "drop.jsonl", "--batch_size", "3", *SMALL, "--engine", "reference"),
        "drop1": _run(model_dir, inp, tmp_path / "drop1.jsonl", *SMALL, "--engine", "reference"),
        "fast": _run(model_dir, inp, tmp_path / "fast.jsonl", "--batch_size", "3", *SMALL),
        "sdpa": _run(model_dir, inp, tmp_path / "sdpa.jsonl", "--batch_size", "3", *SMALL, "--engine", "reference",
                     "--attention", "sdpa"),
        "device_map": _run(model_dir, inp, tmp_path / "map.jsonl", "--batch_size", "2", *SMALL, "--device_map", "auto"),
    }
    drop = _choices(runs["drop"])
    assert [len(tokens) for _, tokens in drop] == MAX_TOKENS
    for name in ("mask", "drop1", "fast", "sdpa", "device_map"):
        assert _choices(runs[name]) == drop, name
    assert _choices(runs["full_fast"]) == _choices(runs["full"])
    assert drop != _choices(runs["full"])
    assert runs["fast"][0]["kv_cache"]["engine"] == "fast" and runs["device_map"][0]["kv_cache"]["engine"] == "reference"
    for result, n in zip(runs["drop"], REQUEST_LENGTHS):
        kv = result["kv_cache"]
        assert kv["prompt_tokens"] == n and kv["heavy_budget"] == int(0.1 * n)
        assert kv["kv_bytes_peak"] < kv["kv_bytes_full"]
        # Multi-head: every head keeps its keys and values (4 heads x 24 dims x 3 layers, float32).
        assert kv["kv_bytes_full"] == (n + len(result["choices"][0]["logprobs"]["tokens"]) - 1) * 3 * 4 * 24 * 2 * 4


def test_an_unknown_or_mismatched_arch_is_refused_naming_the_families(model_dir, tmp_path, capsys):
    arch, folder = model_dir
    inp = _requests(tmp_path / "in.jsonl")
    args = ["--input_path", str(inp), "--output_path", str(tmp_path / "out.jsonl"), "--model_name", str(folder),
            "--no_cuda"]
    assert main([*args, "--model_arch", "gpt2"]) == 2
    error = capsys.readouterr().err
    assert "unsupported architecture 'gpt2'" in error and "opt" in error and "gpt_neox" in error
    other = "gpt_neox" if arch == "opt" else "opt"
    assert main([*args, "--model_arch", other]) == 2
    assert f"does not match the model's architecture '{arch}'" in capsys.readouterr().err


# The paper's scripts and HELM, as a user runs them.

@pytest.mark.parametrize("arch", list(FAMILIES))
def test_the_helm_scripts_and_our_run(arch, tmp_path):
    assert arch in model_archs()  # a deployment h2o-lab/<arch> in helm/prod_env
    folder = save_tiny(arch, tmp_path / f"tiny-{arch}", context=2048)  # XSUM prompts: up to ~1000 words
    results_file = tmp_path / f"xsum-{arch}-h2o.jsonl"
    env = {**os.environ, "OUTPUT": str(results_file), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts/helm/h2o.sh"), "xsum", str(folder), arch, "--sample_num", "2",
                           "--no_cuda"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in results_file.read_text().splitlines()]
    assert len(records) == 2 and all(r["result"]["kv_cache"]["policy"] == "h2o" for r in records)
    import helm_support  # HELM itself: only this test needs it installed

    if helm_support.net_cut() is None:
        pytest.skip("cannot cut the network (unshare -n) for HELM")
    out = tmp_path / "benchmark_output"
    done = helm_support.our_run(str(results_file), "xsum", arch, output_path=out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 requests evaluated" in done.stdout
    # HELM scored these very texts, under the architecture's own deployment.
    state = json.loads((helm_support.run_dir(out, f"xsum-{arch}-h2o") / "scenario_state.json").read_text())
    assert state["adapter_spec"]["model_deployment"] == f"h2o-lab/{arch}"
    scored = {s["request"]["prompt"]: s["result"]["completions"][0]["text"] for s in state["request_states"]}
    assert scored == {r["request"]["prompt"]: r["result"]["choices"][0]["text"] for r in records}


# In a fresh process with TRITON_INTERPRET=1 (Triton reads it at import): the fast engine with the
# Triton kernels on the CPU, and its torch path where the head size does not fit them.
_INTERPRETED = """
import json, torch
from conftest import random_prompts, tiny_tokenizer
from tiny_families import FAMILIES
from h2o.engine.fast import FastEngine, kernels
from h2o.engine.reference.generation import Sampling
from h2o.policies import make_policy
assert kernels.available(torch.device("cpu")), "Triton's interpreter is off"
out = {}
for arch, build in FAMILIES.items():
    for head_dim in (32, 24):
        engine = FastEngine(build(head_dim=head_dim), tiny_tokenizer(), make_policy("h2o", 0.1, 0.1), 2, steps_per_check=4)
        done = engine.run(random_prompts([64, 41], seed=5), [Sampling(max_new_tokens=8), Sampling(max_new_tokens=6)])
        out[f"{arch}-{head_dim}"] = [engine.cache.use_kernels, [c.token_ids for c in done]]
print(json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_the_kernels_serve_both_families_where_the_head_size_fits(tokenizer):
    env = child_env(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")  # _INTERPRETED imports conftest
    done = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    policy = make_policy("h2o", 0.1, 0.1)
    for arch, build in FAMILIES.items():
        for head_dim in (32, 24):
            used_kernels, tokens = results[f"{arch}-{head_dim}"]
            assert used_kernels == (head_dim == 32)
            reference = generate(build(head_dim=head_dim), tokenizer, random_prompts([64, 41], seed=5),
                                 [Sampling(max_new_tokens=8), Sampling(max_new_tokens=6)], Eviction(policy, "drop"))
            assert tokens == _texts(reference), f"{arch}-{head_dim}"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("head_dim", [32, 24], ids=["kernels", "head-24-torch-path"])
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_on_cuda_the_fast_engine_gives_the_reference_results(arch, tokenizer, head_dim):
    # CUDA graphs, continuous batching, and the Triton kernels where the head size fits them
    # (OPT's query arrives scaled, with scaling 1.0); GPT-NeoX heads of 80 or 96 take the torch path.
    from h2o.engine.fast import kernels

    if not kernels.available(torch.device("cuda")):
        pytest.skip("needs Triton")
    model = FAMILIES[arch](head_dim=head_dim).cuda()
    prompts = random_prompts([64, 101, 64, 90, 77], seed=5)
    sampling = [Sampling(max_new_tokens=n) for n in (24, 17, 30, 9, 21)]
    for name in ("full", "h2o", "local"):
        policy = None if name == "full" else make_policy(*POLICIES[name])
        reference = generate(model, tokenizer, prompts, sampling, None if policy is None else Eviction(policy, "drop"))
        engine = FastEngine(model, tokenizer, policy, 2)
        fast = engine.run(prompts, sampling)
        assert _texts(fast) == _texts(reference), name
        for a, b in zip(fast, reference):
            assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-3), name
        assert engine.cache.use_kernels == (head_dim == 32)
        assert engine.stats["captures"] > 0
        if policy is not None:
            greedy = generate_fast(model, prompts, 30, policy).token_ids
            assert [g[: s.max_new_tokens] for g, s in zip(greedy, sampling)] == _texts(reference), name
