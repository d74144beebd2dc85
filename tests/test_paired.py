"""The paired comparison with H2O, on all articles and on those held out from the knob's choice."""

import csv
import math

import pytest

from h2o.lab import paired


def _point(policy, budget, rouge_2, kl=None, kv=2.0):
    record = {"policy": policy, "budget": budget, "n": len(rouge_2), "per_article": {"rouge_2": rouge_2},
              "kv_bytes_budget": kv * 2**20}
    if kl is not None:
        record["kl_per_article"] = kl
    return record


# Student's t quantiles at 0.975 (tables): 2 and 1 degrees of freedom, and 99.
T_2, T_1, T_99 = 4.302653, 12.706205, 1.984217


def test_the_interval_is_students_t_standard_errors_of_the_mean_difference():
    policy, h2o = [0.03, 0.05, 0.07], [0.02, 0.02, 0.02]  # differences 0.01, 0.03, 0.05
    # Mean 0.03; deviations -0.02, 0, 0.02 give a sample standard deviation of 0.02.
    assert paired.paired(policy, h2o) == pytest.approx((0.03, T_2 * 0.02 / math.sqrt(3), 3))
    # From the second article: 0.03 and 0.05, mean 0.04, standard deviation 0.01 * sqrt(2).
    assert paired.paired(policy, h2o, start=1) == pytest.approx((0.04, T_1 * 0.01, 2))
    assert paired.paired(policy, h2o, start=2) is None and paired.paired([0.1], [0.0]) is None
    # At 100 articles t is near the normal's 1.96, at 3 more than twice it.
    hundred = [0.01 * (i % 2) for i in range(100)]
    sd = math.sqrt(sum((v - 0.005) ** 2 for v in hundred) / 99)
    assert paired.mean_ci(hundred) == pytest.approx((0.005, T_99 * sd / 10))
    mean, ci = paired.mean_ci([0.5])
    assert mean == 0.5 and math.isnan(ci)


def test_the_held_out_articles_are_compared_apart(tmp_path):
    h2o = [0.02 + 0.001 * (i % 7) for i in range(120)]
    # Better than H2O on the articles that chose the knob, worse on the 20 held out.
    tuned = [v + (0.010 if i < 100 else -0.004) + 0.0005 * (i % 3) for i, v in enumerate(h2o)]
    points = [_point("full", 1.0, [0.03] * 120, kv=10.0), _point("h2o", 0.2, h2o, kl=[1.0] * 120),
              _point("h2o-shrink:0.5", 0.2, tuned, kl=[0.9 + 0.01 * (i % 2) for i in range(120)]),
              _point("pyramidkv", 0.4, h2o)]  # no H2O at 40%: no row
    [row] = paired.rows(points)
    assert (row["score_diff_all"], row["score_ci95_all"], row["n_all"]) == pytest.approx(paired.paired(tuned, h2o))
    assert (row["score_diff_held_out"], row["score_ci95_held_out"], row["n_held_out"]) == pytest.approx(
        paired.paired(tuned, h2o, start=100))
    assert (row["n_all"], row["n_held_out"], row["kl_n_held_out"]) == (120, 20, 20)
    assert row["score_diff_all"] > 0 > row["score_diff_held_out"] and row["kv_vs_h2o"] == 1.0
    paired.write(tmp_path, points)
    text = (tmp_path / "paired.md").read_text()
    assert "chosen on articles 0-99 only" in text and "held out: articles 100-119" in text
    line = next(line for line in text.splitlines() if "h2o-shrink:0.5" in line)
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[:4] == ["20%", "h2o-shrink:0.5", "2.00", "100%"]
    assert cells[4].startswith("**+0.") and cells[5].startswith("**-0.0")  # both beyond noise
    with open(tmp_path / "paired.csv") as handle:
        [saved] = list(csv.DictReader(handle))
    assert float(saved["score_diff_held_out"]) == pytest.approx(row["score_diff_held_out"])


def test_a_sweep_of_the_tuning_articles_alone_has_no_held_out_numbers():
    h2o = [0.02, 0.03, 0.01, 0.02]
    [row] = paired.rows([_point("h2o", 0.1, h2o), _point("tova", 0.1, [v + 0.01 for v in h2o])])
    assert row["score_diff_held_out"] is None and row["n_held_out"] == 0 and row["kl_n_all"] == 0
    assert "| 10% | tova | 2.00 | 100% | **+0.0100 ± 0.0000** | - | - | - |" in paired.markdown([row])


def test_the_report_shows_the_budget_bytes_and_writes_the_paired_table(tmp_path):
    import json

    from h2o.lab import report

    (tmp_path / "points").mkdir()
    for name, record in (("full", _point("full", 1.0, [0.03, 0.02, 0.04], kv=10.0)),
                         ("h2o-20", _point("h2o", 0.2, [0.02, 0.01, 0.03])),
                         ("pyramidkv-20", _point("pyramidkv", 0.2, [0.03, 0.02, 0.03]))):
        record.update(kv_bytes_peak=3 * 2**20, kv_bytes_full=10 * 2**20)
        (tmp_path / "points" / f"{name}.json").write_text(json.dumps(record))
    report.write(tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "| KV MiB budget | KV MiB peak |" in text and "[paired.md](paired.md)" in text
    assert "| pyramidkv | 20% | 3 |" in text and "| 2.00 | 3.00 | 30% |" in text
    assert "| 20% | pyramidkv | 2.00 | 100% |" in (tmp_path / "paired.md").read_text()


def test_on_a_task_no_knob_was_chosen_on_every_article_is_held_out(tmp_path):
    h2o = [0.02 + 0.001 * (i % 7) for i in range(120)]
    points = [_point("h2o", 0.2, h2o), _point("tova", 0.2, [v - 0.002 * (i % 2) for i, v in enumerate(h2o)])]
    assert paired.tuned_on("xsum") == paired.TUNED_ON and paired.tuned_on("needle") == 0
    [row] = paired.rows(points, paired.tuned_on("needle"))
    assert row["n_held_out"] == row["n_all"] == 120
    paired.write(tmp_path, points, paired.tuned_on("needle"))
    text = (tmp_path / "paired.md").read_text()
    assert "never on this task: every article is held out" in text and "held out:" not in text
    header = next(line for line in text.splitlines() if line.startswith("| budget"))
    assert header == "| budget | policy | KV MiB | KV / H2O | ROUGE-2 − H2O | KL − H2O |"
    line = next(line for line in text.splitlines() if "| tova |" in line)
    assert len(line.split("|")) == len(header.split("|"))
