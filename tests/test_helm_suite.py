"""Several results files as one HELM suite: a model per point, compared in helm-server's leaderboard.

The end-to-end test evaluates made-up results of three points with the network cut, two in one
our_run.sh call and the third added later (as the sweep adds its points), then reads what
helm-summarize wrote for the viewer: the leaderboard opens on XSUM, with one row per point, each
with the ROUGE-2 that rouge-score gives that point's texts.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import helm_support
from lab_helm import evaluate, suite_env

ROOT = Path(__file__).resolve().parents[1]

N = 3


def summaries(kind: str) -> list[str]:
    """Texts whose ROUGE-2 differs from kind to kind, so a row showing another point's file fails."""
    articles = helm_support.articles(N)
    if kind == "reference":
        return [" " + " ".join(a["summary"].split()[:12]) for a in articles]
    return [helm_support.lead(a["document"], {"lead": 25, "short": 6}[kind]) for a in articles]


POINTS = {  # name: (texts, kv-cache policy, heavy ratio, display name)
    "full": ("lead", "full", None, "Full cache"),
    "h2o-20": ("reference", "h2o", 0.1, "H2O 20% (10% heavy + 10% recent)"),
    "local-20": ("short", "h2o", 0.0, "Local 20% (recent window only)"),
}


def write_point(folder: Path, name: str) -> Path:
    kind, policy, heavy, _ = POINTS[name]
    rows = []
    for request, text in zip(helm_support.requests(N), summaries(kind)):
        result = helm_support.fake_result(text, policy=policy)
        if heavy is not None:
            result["kv_cache"].update(heavy_ratio=heavy, recent_ratio=0.2 - heavy)
        rows.append((request, result))
    return helm_support.write_results(folder / f"{name}.jsonl", rows)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    if helm_support.net_cut() is None:
        pytest.skip("cannot cut the network (unshare -n)")
    tmp = tmp_path_factory.mktemp("suite")
    files = {name: write_point(tmp, name) for name in POINTS}
    out = tmp / "benchmark_output"
    first = helm_support.our_run(f"full={files['full']},h2o-20={files['h2o-20']}", "xsum", "llama", "cmp", output_path=out)
    assert first.returncode == 0, first.stdout + first.stderr
    added = helm_support.our_run(f"local-20={files['local-20']}", "xsum", "llama", "cmp", output_path=out)
    assert added.returncode == 0, added.stdout + added.stderr
    return {"out": out, "files": files, "stdout": first.stdout + added.stdout}


def expected_rouge_2(path: Path) -> float:
    texts = [json.loads(line)["result"]["choices"][0]["text"] for line in path.read_text().splitlines()]
    return helm_support.expected_rouge(texts, [a["summary"] for a in helm_support.articles(N)], "rouge2")


def test_the_leaderboard_opens_on_xsum_with_a_row_per_point(suite):
    runs = suite["out"] / "runs" / "cmp"
    index = json.loads((runs / "groups.json").read_text())
    landing = index[0]["rows"][0][0]
    assert landing["value"] == "XSUM" and landing["href"] == "?group=summarization_xsum"

    (table, *_) = json.loads((runs / "groups" / "summarization_xsum.json").read_text())
    header = [h["value"] for h in table["header"]]
    assert header[:7] == ["Model", "ROUGE-2", "ROUGE-1", "ROUGE-L", "Coverage", "Density", "Compression"]
    assert [row[0]["value"] for row in table["rows"]] == [display for *_, display in POINTS.values()]
    shown = [row[header.index("ROUGE-2")]["value"] for row in table["rows"]]
    wanted = [expected_rouge_2(suite["files"][name]) for name in POINTS]
    assert shown == pytest.approx(wanted, abs=1e-12)
    assert len(set(wanted)) == len(wanted)  # the rows can only match if each reads its own file


def test_each_point_is_its_own_model_and_its_own_table_row(suite):
    out = suite["out"]
    deployments = suite_env.models(suite_env.folder(out, "cmp"))
    assert deployments == [f"h2o-lab/llama-{name}" for name in POINTS]
    assert "local-20: 3 requests evaluated" in suite["stdout"]
    table = subprocess.run([str(ROOT / "helm" / "lab_table.sh"), "--output-path", str(out), "cmp"],
                           capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == list(POINTS)
    assert [r[3] for r in rows] == [f"{expected_rouge_2(suite['files'][n]):.4f}" for n in POINTS]


def prepare(tmp_path: Path, *points: str) -> int:
    return evaluate.main(["prepare", *(a for p in points for a in ("--point", p)), "--suite", "s",
                          "--output-path", str(tmp_path / "out")])


@pytest.mark.parametrize("points, message", [
    (("h2o=a.jsonl", "h2o=b.jsonl"), "point 'h2o' is given twice"),
    (("h2o/20=a.jsonl",), "must be NAME=FILE"),
    (("h2o=",), "must be NAME=FILE"),
])
def test_bad_points(tmp_path, capsys, points, message):
    assert prepare(tmp_path, *points) == 2
    assert message in capsys.readouterr().err


def test_points_need_a_suite_name(tmp_path):
    done = helm_support.our_run("full=a.jsonl", output_path=tmp_path / "out", cut=False)
    assert done.returncode == 2 and "output_name is required with points" in done.stderr


@pytest.mark.parametrize("kv, shown", [
    ({"policy": "full"}, "Full cache"),
    ({"policy": "h2o", "heavy_ratio": 0.05, "recent_ratio": 0.05}, "H2O 10% (5% heavy + 5% recent)"),
    ({"policy": "h2o", "heavy_ratio": 0.0, "recent_ratio": 0.4}, "Local 40% (recent window only)"),
    ({"policy": "tova", "heavy_ratio": 0.0, "recent_ratio": 0.2}, "TOVA 20%"),
])
def test_display_names(kv, shown):
    assert suite_env.display_name(kv) == shown
