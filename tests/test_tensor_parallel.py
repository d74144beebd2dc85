"""Tensor parallel on the CPU: gloo ranks under torchrun, the model sharded by transformers' own
plan, give what one process gives, alone or as groups that split the requests; each rank holds the
cache of its own KV heads."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from transformers import LlamaConfig, OPTConfig

from conftest import ROOT, child_env, random_prompts
from h2o import models
from h2o.serve.cli import main
from h2o.serve.options import parser

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
FLAGS = {"h2o": ["--enable_small_cache"], "local": ["--enable_small_cache", "--heavy_ratio", "0"], "full": []}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp") / "in.jsonl"
    with open(path, "w") as f:
        for prompt in random_prompts([40, 70, 25, 90, 55], seed=3):
            request = {"prompt": " ".join(f"w{t - 2}" for t in prompt), "temperature": 0.5, "max_tokens": 10,
                       "stop": [], "top_p": 1, "n": 1}
            f.write(json.dumps({"request": request}) + "\n")
    return path


def _torchrun(*args, ranks=2):
    env = child_env(OMP_NUM_THREADS="1")  # the scripts import conftest
    # --standalone: a free port each time, so runs never meet.
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", str(ranks), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def _texts(path):
    return [json.loads(line)["result"]["choices"][0]["text"] for line in open(path)]


@needs_torchrun
@pytest.mark.parametrize("engine, policy", [("fast", "h2o"), ("fast", "local"), ("fast", "full"), ("reference", "h2o")])
def test_two_ranks_give_the_single_process_results(tiny_model_dir, inputs, tmp_path, engine, policy):
    common = ["--input_path", str(inputs), "--model_name", str(tiny_model_dir), "--no_cuda", "--batch_size", "2",
              "--engine", engine, *FLAGS[policy]]
    assert main([*common, "--output_path", str(tmp_path / "single.jsonl")]) == 0
    done = _torchrun(str(ROOT / "run_helm.py"), *common, "--output_path", str(tmp_path / "tp.jsonl"),
                     "--tensor_parallel")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _texts(tmp_path / "tp.jsonl") == _texts(tmp_path / "single.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["single.jsonl", "tp.jsonl"]  # no parts, no locks


@needs_torchrun
def test_two_groups_of_two_ranks_split_the_requests(tiny_model_dir, inputs, tmp_path):
    modes = {"fast-h2o": FLAGS["h2o"], "fast-full": FLAGS["full"], "reference-h2o": ["--engine", "reference",
                                                                                       *FLAGS["h2o"]]}
    common = ["--input_path", str(inputs), "--model_name", str(tiny_model_dir), "--no_cuda", "--batch_size", "2"]
    for mode, flags in modes.items():
        assert main([*common, *flags, "--output_path", str(tmp_path / f"{mode}.single.jsonl")]) == 0
    # A resumed run: the output answers request 0, group 1's part (requests 2 and 4) request 2.
    lines = open(tmp_path / "fast-h2o.single.jsonl").readlines()
    (tmp_path / "fast-h2o.jsonl").write_text(lines[0])
    kept = json.loads(lines[2])
    kept["result"]["choices"][0]["text"] = "from the part"
    (tmp_path / "fast-h2o.jsonl.part1-of-2").write_text(json.dumps(kept) + "\n")
    script = tmp_path / "modes.py"  # one torchrun start for every mode
    script.write_text(
        "import os\nfrom h2o import models\nfrom h2o.serve.cli import main\nload = models.load_model\n"
        "def spy(*args, **kwargs):  # each rank's rows of the first k_proj: one KV head of 16 dimensions\n"
        "    model = load(*args, **kwargs)\n"
        "    rows = model.model.layers[0].self_attn.k_proj.weight.to_local().shape[0]\n"
        f"    open({str(tmp_path)!r} + '/rows' + os.environ['RANK'], 'a').write(f'{{rows}} ')\n"
        "    return model\n"
        "models.load_model = spy\n"
        f"for mode, flags in {modes!r}.items():\n"
        f"    assert main([*{common!r}, *flags, '--tensor_parallel', '2', '--output_path', {str(tmp_path)!r} + "
        "f'/{mode}.jsonl']) == 0, mode\n"
    )
    done = _torchrun(str(script), ranks=4)
    assert done.returncode == 0, done.stderr[-3000:]
    for mode in modes:
        expected = _texts(tmp_path / f"{mode}.single.jsonl")
        if mode == "fast-h2o":
            expected[2] = "from the part"
        assert _texts(tmp_path / f"{mode}.jsonl") == expected, mode
        assert [json.loads(line)["request"] for line in open(tmp_path / f"{mode}.jsonl")] == [
            json.loads(line)["request"] for line in open(inputs)]
    assert [(tmp_path / f"rows{rank}").read_text() for rank in range(4)] == ["16 16 16 "] * 4
    assert sorted(p.name for p in tmp_path.glob("*.jsonl*") if ".single." not in p.name) == sorted(
        f"{mode}.jsonl" for mode in modes)  # no parts, no locks


@needs_torchrun
def test_each_rank_holds_the_cache_of_its_own_kv_heads(tiny_model_dir, tmp_path):
    script = tmp_path / "shapes.py"
    script.write_text(
        "import torch.distributed as dist\n"
        "from conftest import random_prompts, tiny_tokenizer\n"
        "from h2o import models\nfrom h2o.engine.fast.engine import FastEngine\nfrom h2o.engine.sampling import Sampling\n"
        "from h2o.policies import make_policy\n"
        "dist.init_process_group('gloo')\n"
        f"model = models.load_model({str(tiny_model_dir)!r}, tensor_parallel=2)\n"
        "engine = FastEngine(model, tiny_tokenizer(), make_policy('h2o', 0.1, 0.1), 2)\n"
        "engine.run(random_prompts([40, 60]), [Sampling(max_new_tokens=4)] * 2)\n"
        f"open({str(tmp_path)!r} + f'/heads{{dist.get_rank()}}', 'w').write(str(engine.cache.blocks['keys'].shape[1]))\n"
    )
    done = _torchrun(str(script))
    assert done.returncode == 0, done.stderr[-3000:]
    # 2 KV heads over 2 ranks: one each.
    assert [(tmp_path / f"heads{rank}").read_text() for rank in (0, 1)] == ["1", "1"]


def test_tensor_parallel_is_refused_where_it_cannot_run(tiny_model_dir, tmp_path, capsys, monkeypatch):
    common = ["--input_path", str(ROOT / "data" / "xsum.jsonl"), "--output_path", str(tmp_path / "o.jsonl"),
              "--model_name", str(tiny_model_dir), "--tensor_parallel"]
    assert main(common) == 2
    assert "--tensor_parallel: start run_helm.py with torchrun --nproc_per_node N" in capsys.readouterr().err
    assert main([*common, "--device_map", "auto"]) == 2
    assert "--tensor_parallel and --device_map each place the model" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "4")
    for size in ("0", "1", "3", "8"):
        assert main([*common, size]) == 2
        assert capsys.readouterr().err == (f"run_helm.py: error: --tensor_parallel {size}: K must be 2 to 4 and "
                                           "divide the 4 ranks\n")
    assert parser().parse_args(["--tensor_parallel"]).tensor_parallel == 4  # alone: every rank
    with pytest.raises(ValueError, match="no tensor-parallel plan for opt"):
        models.check_tensor_parallel(OPTConfig(), 2)
    with pytest.raises(ValueError, match="9 query and 3 KV heads do not split over 2 ranks"):
        models.check_tensor_parallel(LlamaConfig(num_attention_heads=9, num_key_value_heads=3, hidden_size=576), 2)
    models.check_tensor_parallel(LlamaConfig(num_attention_heads=4, num_key_value_heads=2, hidden_size=64), 2)
    with pytest.raises(ValueError, match="4 query and 2 KV heads do not split over 4 ranks"):
        models.check_tensor_parallel(LlamaConfig(num_attention_heads=4, num_key_value_heads=2, hidden_size=64), 4)
