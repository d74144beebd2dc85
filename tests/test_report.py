"""The sweep's bookkeeping and report, on made-up points (no model, no HELM)."""

import json

import pytest
import torch
from matplotlib.container import ErrorbarContainer

from h2o.lab import report
from h2o.lab.points import Point, points
from h2o.serve.options import ServeOptions


def test_points_split_budgets_as_the_paper():
    assert Point("h2o", 0.2).ratios() == (0.1, 0.1)
    assert Point("local", 0.2).ratios() == (0.0, 0.2)
    assert Point("h2o-sink", 0.2).ratios() == (0.1, 0.1) and Point("tova", 0.2).ratios() == (0.0, 0.2)
    base = ServeOptions("out.jsonl")
    local = Point("local", 0.2).serve_options(base)
    assert (local.enable_small_cache, local.policy) == (True, "h2o")
    assert Point("sink", 0.04).name == "sink-04" and Point("full", 1.0).serve_options(base) == base
    grid = points(["h2o", "local"], [0.1, 0.2])
    assert [p.name for p in grid] == ["full", "h2o-10", "local-10", "h2o-20", "local-20"]


def _point(folder, policy, budget, rouge_2, kv=100.0):
    record = {"policy": policy, "budget": budget, "n": len(rouge_2), "rouge_1": 0.3, "rouge_2": sum(rouge_2) / len(rouge_2),
              "rouge_l": 0.2, "per_article": {"rouge_2": rouge_2}, "kv_bytes_peak": kv * 2**20,
              "kv_bytes_full": 500 * 2**20}
    if policy != "full":
        record.update(kl_per_article=[0.5, 1.5], agreement_per_article=[0.5, 1.0], kl_by_step=[0.01, 0.9, 1.2])
    (folder / "points" / f"{Point(policy, budget).name}.json").write_text(json.dumps(record))


def _drawn(monkeypatch) -> dict:
    """Filled as report.write saves each figure: {file name: {legend label: y values, left to right}}."""
    drawn, save = {}, report.save_figure

    def spy(fig, ax, path):
        handles, labels = ax.get_legend_handles_labels()
        lines = [h.lines[0] if isinstance(h, ErrorbarContainer) else h for h in handles]  # errorbar: its data line
        drawn[path.name] = {label: [y for _, y in sorted(zip(line.get_xdata(), line.get_ydata()))]
                            for label, line in zip(labels, lines)}
        save(fig, ax, path)

    monkeypatch.setattr(report, "save_figure", spy)
    return drawn


def test_report_tables_plots_and_a_verdict_on_noise(tmp_path, monkeypatch):
    (tmp_path / "points").mkdir()
    _point(tmp_path, "full", 1.0, [0.10, 0.12, 0.08, 0.10], kv=500)
    _point(tmp_path, "h2o", 0.2, [0.08, 0.10, 0.06, 0.08])
    _point(tmp_path, "sink", 0.2, [0.09, 0.11, 0.07, 0.09])  # +0.01 on every article: a real gain
    _point(tmp_path, "local", 0.2, [0.20, 0.00, 0.16, 0.0])  # higher mean, all noise
    _point(tmp_path, "h2o", 0.1, [0.05, 0.05, 0.05, 0.05])
    drawn = _drawn(monkeypatch)
    report.write(tmp_path)
    assert (tmp_path / "results.csv").stat().st_size > 0 and (tmp_path / "results.md").stat().st_size > 0
    # Each plot shows every policy's points and the full cache's level, from the points' numbers.
    steps = [0.01, 0.9, 1.2]
    assert drawn == {
        "rouge2_vs_budget.png": {"h2o": [0.05, 0.08], "local": [0.09], "sink": [0.09], "full cache": [0.10, 0.10]},
        "kv_vs_budget.png": {"h2o": [100, 100], "local": [100], "sink": [100], "full cache": [500, 500]},
        "kl_vs_budget.png": {"h2o": [1.0, 1.0], "local": [1.0], "sink": [1.0]},  # the full cache has no KL
        "kl_by_step.png": {"h2o": steps, "local": steps, "sink": steps},  # at the 20% budget
    }
    assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for name in drawn)
    rows = {(r["policy"], r["budget"]): r for r in report.rows(report.load(tmp_path))}
    assert rows[("h2o", 0.2)]["rouge_2_vs_full"] == pytest.approx(0.8)
    assert rows[("h2o", 0.2)]["kv_vs_full"] == pytest.approx(0.2)
    assert rows[("h2o", 0.2)]["kl_mean"] == pytest.approx(1.0) and rows[("h2o", 0.2)]["agreement"] == 0.75
    assert report.h2o_against_full(report.load(tmp_path)) == [
        # Differences -0.05, -0.07, -0.03, -0.05: sd 0.0163, t(3) = 3.182, half-width 3.182 x 0.0163 / 2.
        "- 10%: -0.0500 ± 0.0260 per article (loses: beyond noise)",
        "- 20%: -0.0200 ± 0.0000 per article (loses: beyond noise)",
    ]
    verdicts = report.best_per_budget(report.load(tmp_path))
    assert verdicts[0].startswith("- 10%: **h2o**")
    assert verdicts[1].startswith("- 20%: **local**") and "within noise" in verdicts[1]
    del_local = tmp_path / "points" / "local-20.json"
    del_local.unlink()
    verdicts = report.best_per_budget(report.load(tmp_path))
    assert verdicts[1].startswith("- 20%: **sink**") and "+0.0100" in verdicts[1] and "beyond noise" in verdicts[1]


def test_the_lowest_kl_is_named_with_its_paired_difference_to_h2o(tmp_path):
    (tmp_path / "points").mkdir()
    for policy, kl in (("h2o", [1.0, 2.0, 1.5, 1.2]), ("tova", [0.9, 1.9, 1.4, 1.1]), ("local", [3.0, 1.0, 0.2, 2.0])):
        _point(tmp_path, policy, 0.2, [0.1] * 4)
        record = json.loads((tmp_path / "points" / f"{Point(policy, 0.2).name}.json").read_text())
        (tmp_path / "points" / f"{Point(policy, 0.2).name}.json").write_text(json.dumps({**record, "kl_per_article": kl}))
    [line] = report.closest_per_budget(report.load(tmp_path))
    assert line.startswith("- 20%: **tova** (KL 1.3250, n=4)") and "-0.1000" in line and "beyond noise" in line


def test_a_sweep_refuses_to_resume_a_report_made_with_other_settings(tmp_path, capsys):
    from h2o.lab import sweep

    folder = tmp_path / "xsum-smollm2"
    folder.mkdir()
    (folder / "settings.json").write_text(json.dumps(
        {"task": "xsum", "model": "smollm2", "arch": "llama", "dtype": "float32", "chat_template": "auto"}))
    with pytest.raises(SystemExit, match=r"made with --dtype float32 \(now bfloat16\)"):
        sweep.main(["--reports", str(tmp_path), "--dtype", "bfloat16", "--n", "1"])
    assert not (folder / "points").exists() or not any((folder / "points").iterdir())
    assert sweep.main(["--reports", str(tmp_path), "--policies", "h2o,nope"]) == 2
    assert "unknown --policies ['nope']" in capsys.readouterr().err


def test_a_report_generated_on_one_device_is_not_resumed_on_another_but_scored_anywhere(tmp_path, capsys):
    from h2o.lab import sweep

    folder = tmp_path / "xsum-smollm2"
    folder.mkdir()
    made = {"task": "xsum", "model": "smollm2", "arch": "llama", "dtype": "bfloat16", "chat_template": "auto",
            "device": "cuda", "made_with": {"torch": "2.11.0+cu130"}}
    (folder / "settings.json").write_text(json.dumps(made))
    flags = ["--reports", str(tmp_path), "--dtype", "bfloat16", "--n", "1", "--policies", "h2o", "--budgets", "0.2"]
    with pytest.raises(SystemExit, match=r"made with --device cuda \(now cpu\)"):
        sweep.main([*flags, "--device", "cpu", "--stage", "generate"])
    # Scoring computes nothing on the device: it goes on to the points, here not generated.
    assert sweep.main([*flags, "--stage", "score"]) == 2
    assert capsys.readouterr().err.startswith(f"sweep: error: {folder / 'generated' / 'full.json'}: no record")
    assert json.loads((folder / "settings.json").read_text()) == made


def test_a_new_report_records_where_it_was_generated(tmp_path, monkeypatch):
    from h2o.lab import sweep

    monkeypatch.setattr(sweep.Sweep, "generate", lambda self, point, tag: None)
    assert sweep.main(["--reports", str(tmp_path), "--n", "1", "--policies", "h2o", "--budgets", "0.2",
                       "--device", "cpu", "--stage", "generate"]) == 0
    settings = json.loads((tmp_path / "xsum-smollm2" / "settings.json").read_text())
    assert settings["device"] == "cpu" and settings["dtype"] == "float32"
    assert settings["made_with"]["torch"] == torch.__version__ and settings["made_with"]["gpu"] is None


def test_when_h2o_is_best_it_is_weighed_against_the_runner_up(tmp_path):
    (tmp_path / "points").mkdir()
    _point(tmp_path, "h2o", 0.04, [0.10, 0.12, 0.08, 0.10])
    _point(tmp_path, "tova", 0.04, [0.08, 0.10, 0.06, 0.08])
    _point(tmp_path, "local", 0.04, [0.0, 0.0, 0.0, 0.0])
    [line] = report.best_per_budget(report.load(tmp_path))
    assert line.startswith("- 4%: **h2o**") and "vs tova +0.0200 ± 0.0000" in line and "beyond noise" in line


def test_summaries_put_every_points_text_side_by_side(tmp_path):
    (tmp_path / "points").mkdir()
    (tmp_path / "results").mkdir()
    _point(tmp_path, "full", 1.0, [0.1, 0.1])
    _point(tmp_path, "h2o", 0.2, [0.1, 0.1])
    for name, texts in (("full", ["a", "b"]), ("h2o-20", ["c", "d"]), ("local-20", ["e", "f"])):
        lines = [json.dumps({"request": {}, "result": {"choices": [{"text": t}]}}) for t in texts]
        (tmp_path / "results" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    report.write(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "summaries.jsonl").read_text().splitlines()]
    # local-20 has no finished point: its results may be partial and stay out.
    assert rows == [{"article": 0, "full": "a", "h2o-20": "c"}, {"article": 1, "full": "b", "h2o-20": "d"}]
    # A fresh clone has no results files: the finished points keep their texts.
    for path in (tmp_path / "results").iterdir():
        path.unlink()
    report.write(tmp_path)
    assert [json.loads(line) for line in (tmp_path / "summaries.jsonl").read_text().splitlines()] == rows
    # A point no longer finished takes its texts with it.
    (tmp_path / "points" / "h2o-20.json").unlink()
    report.write(tmp_path)
    assert [json.loads(line) for line in (tmp_path / "summaries.jsonl").read_text().splitlines()] == [
        {"article": 0, "full": "a"}, {"article": 1, "full": "b"}]


def test_a_needle_report_ranks_by_recall_and_draws_its_grid(tmp_path):
    (tmp_path / "points").mkdir()
    cells = [[1024, 0], [1024, 100], [8192, 0], [8192, 100]] * 2
    for policy, budget, recall in (("full", 1.0, [1, 1, 1, 1, 1, 1, 1, 0]), ("h2o", 0.1, [1, 0, 1, 0, 1, 1, 0, 0]),
                                   ("local", 0.1, [0, 1, 0, 1, 0, 1, 0, 1])):
        record = {"policy": policy, "budget": budget, "n": 8, "scores": ["ruler_string_match_part"],
                  "main": "ruler_string_match_part", "ruler_string_match_part": sum(recall) / 8,
                  "per_article": {"ruler_string_match_part": recall}, "cells": cells,
                  "kv_bytes_peak": 2**20, "kv_bytes_full": 10 * 2**20}
        (tmp_path / "points" / f"{Point(policy, budget).name}.json").write_text(json.dumps(record))
    report.write(tmp_path)
    points = report.load(tmp_path)
    rows = {r["policy"]: r for r in report.rows(points)}
    assert rows["h2o"]["ruler_string_match_part_vs_full"] == pytest.approx(0.5 / 0.875)
    assert "ruler_string_match_part_ci95" in (tmp_path / "results.csv").read_text().splitlines()[0]
    assert "| recall (± 95% CI) | recall / full |" in (tmp_path / "results.md").read_text()
    assert report.best_per_budget(points)[0].startswith("- 10%: **h2o** (recall 0.5000")
    full = next(p for p in points if p["policy"] == "full")
    assert report.grid(full, "ruler_string_match_part") == ([1024, 8192], [0, 100], [[1.0, 1.0], [1.0, 0.5]])
    for name in ("recall_vs_budget.png", "needle_grid.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_the_score_stage_keeps_the_tasks_scores_in_request_order_and_the_needles_cells(tmp_path):
    from h2o.lab.sweep import _scores
    from lab_helm.tasks import get_task

    stats = [{"name": {"name": "ruler_string_match_part", "split": "test"}, "mean": 2 / 3}]
    per_instance = [{"instance_id": f"id{i}", "stats": [{"name": {"name": "ruler_string_match_part"}, "mean": v},
                                                        {"name": {"name": "num_output_tokens"}, "mean": 9}]}
                    for i, v in ((10, 0.0), (2, 1.0), (0, 1.0))]  # HELM's order is not the requests'
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    (tmp_path / "per_instance_stats.json").write_text(json.dumps(per_instance))
    record = _scores(tmp_path, get_task("needle"))
    assert record["main"] == "ruler_string_match_part" and record["ruler_string_match_part"] == 2 / 3
    assert record["per_article"] == {"ruler_string_match_part": [1.0, 1.0, 0.0]}
    assert record["cells"] == [[1024, 0], [1024, 25], [1024, 50]]


def test_a_sweep_of_more_articles_than_the_task_has_takes_them_all(tmp_path, monkeypatch, capsys):
    from h2o.lab import sweep

    seen = []
    monkeypatch.setattr(sweep.Sweep, "generate", lambda self, point, tag: seen.append(self.options.n))
    assert sweep.main(["--reports", str(tmp_path), "--task", "needle", "--n", "500", "--policies", "h2o",
                       "--budgets", "0.2", "--device", "cpu", "--stage", "generate"]) == 0
    assert seen == [100, 100] and "data/needle.jsonl has 100 requests" in capsys.readouterr().out
