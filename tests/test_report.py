"""fasttrain.report on fake run directories: seed statistics, the final/best blocks (and the fallbacks of
older metrics.json files), the Markdown table, the JSON and the plot, the command line, and the committed
demo results."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fasttrain.report import group_by_setting, expand, main, markdown, plot_groups, read_run, summarize, write_results

ROOT = Path(__file__).resolve().parents[1]
ROW = ("epoch", "split", "top1", "top5", "many", "medium", "few")


def fake_run(path: Path, *, seed=0, final=None, best=None, top_level_only=False, **config) -> Path:
    """A run directory as the engine leaves it: config.yaml and metrics.json in fasttrain.evaluate's layout
    (per_class at the top level only; the best block's own when its epoch is not the final one)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"data": "d", "out": str(path), "seed": seed, "resume": "",
                                                      "loss": "ce", "lr": 0.1} | config))
    final = {"epoch": 9, "split": "test", "top1": 50.0, "top5": 90.0, "many": 70.0, "medium": 45.0, "few": 20.0,
             "per_class": [70.0, 45.0, 20.0]} | (final or {})
    metrics = {k: final[k] for k in ROW} | {"per_class": final["per_class"], "train_class_counts": [150, 50, 5]}
    if not top_level_only:
        metrics["final"] = {k: final[k] for k in ROW} | {"label": "final epoch"}
        if best is not None:
            best = {"epoch": 7, "split": "test", "selected_on": "val", "top1": 55.0, "top5": 91.0, "many": 72.0,
                    "medium": 50.0, "few": 30.0, "per_class": [72.0, 50.0, 30.0], "label": "best"} | best
            if best["epoch"] == final["epoch"]:
                del best["per_class"]
            metrics["best"] = best
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def test_summarize_means_sample_sd_and_none(tmp_path):
    ce = [fake_run(tmp_path / f"ce_s{s}", seed=s, final={"top1": t, "few": f}, best={"top1": t + 2, "epoch": e})
          for s, t, f, e in ((0, 50.0, 10.0, 5), (1, 52.0, None, 6), (2, 57.0, 40.0, 8))]
    ldam = [fake_run(tmp_path / "ldam_s0", seed=0, final={"top1": 60.0}, best={"top1": 61.0})]
    summary = summarize({"CE": ce, "LDAM": ldam})
    assert summary["seeds"] == [0, 1, 2]
    row = summary["rows"][0]
    assert row["method"] == "CE" and row["runs"] == [str(p) for p in ce] and row["seeds"] == [0, 1, 2]
    top1 = row["final"]["top1"]
    assert top1["per_seed"] == [50.0, 52.0, 57.0] and math.isclose(top1["mean"], 53.0)
    assert math.isclose(top1["sd"], math.sqrt((9 + 1 + 16) / 2))          # ddof = 1
    few = row["final"]["few"]                                              # None kept, left out of the mean
    assert few["per_seed"] == [10.0, None, 40.0] and math.isclose(few["mean"], 25.0)
    assert row["best"]["top1"]["per_seed"] == [52.0, 54.0, 59.0] and row["best"]["epoch"]["per_seed"] == [5, 6, 8]
    assert row["split"] == {"final": "test", "best": "test", "selected_on": "val"}
    one = summary["rows"][1]
    assert one["final"]["top1"] == {"mean": 60.0, "sd": 0.0, "per_seed": [60.0]}

    table = markdown(summary)
    assert "| CE | 53.0 ± 3.6 | 70.0 ± 0.0 | 45.0 ± 0.0 | 25.0 ± 21.2 | 10 |" in table
    assert "| LDAM | 60.0 | 70.0 | 45.0 | 20.0 | 10 |" in table                 # one run: the value alone
    assert "**Best epoch** (test split), selected on val top-1" in table
    assert "| CE | 55.0 ± 3.6 |" in table and "| 6/7/9 |" in table          # best epochs differ: each shown

    write_results(summary, tmp_path / "out" / "results.json")
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == summary
    assert not list((tmp_path / "out").glob(".*"))                          # no temporary file left
    plot_groups(summary, tmp_path / "groups.png")
    assert (tmp_path / "groups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_old_metrics_without_blocks_fall_back(tmp_path):
    run = fake_run(tmp_path / "old", final={"top1": 41.5, "epoch": 3}, top_level_only=True)
    row = summarize({"old": [run]})["rows"][0]
    assert row["final"]["top1"]["mean"] == 41.5 and row["final"]["epoch"]["mean"] == 3
    assert row["best"]["top1"] == {"mean": None, "sd": None, "per_seed": [None]}
    table = markdown(summarize({"old": [run]}))
    assert "| old | 41.5 |" in table and "Best epoch" not in table


def test_missing_metrics_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metrics.json" in err and err.count("\n") == 1


def test_grouping_by_config_and_chains(tmp_path):
    for s in (0, 1):   # two seeds of a chain: stages pair up across seeds, labels lose the seed
        for stage, loss in (("ce", "ce"), ("ldam_drw", "ldam")):
            fake_run(tmp_path / f"c10_s{s}" / stage, seed=s, loss=loss, final={"top1": 40.0 + 10 * s},
                     pretrained=f"{tmp_path}/c10_s{s}/rotation/backbone.pt")
    fake_run(tmp_path / "lr05", seed=0, lr=0.05)                   # differs in more than the seed: own row
    fake_run(tmp_path / "other_ssp" / "ce", seed=1, pretrained=f"{tmp_path}/elsewhere/backbone.pt")  # own row
    fake_run(tmp_path / "again" / "ce", seed=0, pretrained=f"{tmp_path}/c10_s0/rotation/backbone.pt")  # seed 0 twice
    runs = expand([tmp_path / "c10_s1", tmp_path / "c10_s0", tmp_path / "lr05", tmp_path / "other_ssp",
                   tmp_path / "again"])
    assert [label for label, _ in runs][:2] == ["c10_s1/ce", "c10_s1/ldam_drw"]
    groups = group_by_setting(runs)
    assert list(groups) == ["c10/ce", "c10/ldam_drw", "lr05", "other_ssp/ce", "again/ce"]
    assert groups["c10/ce"] == [tmp_path / "c10_s0" / "ce", tmp_path / "c10_s1" / "ce"]   # seed order
    assert groups["lr05"] == [tmp_path / "lr05"]


@pytest.mark.slow
def test_command_line_writes_table_and_plot(tmp_path):
    for s in (0, 1):
        fake_run(tmp_path / f"ce_seed{s}", seed=s, final={"top1": 50.0 + 2 * s}, best={})
    out = tmp_path / "cmp" / "table.md"
    r = subprocess.run([sys.executable, "-m", "fasttrain.report", tmp_path / "ce_seed0", tmp_path / "ce_seed1",
                        "--out", out], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "| ce | 51.0 ± 1.4 |" in r.stdout and out.read_text() in r.stdout
    assert out.with_suffix(".png").stat().st_size > 0


def test_read_run_gives_whole_blocks_from_the_file_that_keeps_per_class_once(tmp_path):
    """The engine's own files: per_class is written once; read_run puts it back into each block."""
    from fasttrain.confusion import Confusion
    from fasttrain.evaluate import summarize as evaluation_summary
    from fasttrain.evaluate import write_report
    final = evaluation_summary(Confusion.from_pairs([0, 1, 2, 2], [0, 1, 2, 0], 3), 4, [150, 50, 5])
    final |= {"epoch": 9, "split": "test"}
    for name, best in (("same", dict(final)), ("earlier", evaluation_summary(
            Confusion.from_pairs([0, 1, 2], [0, 0, 0], 3), 3, [150, 50, 5]) | {"epoch": 4, "split": "test"})):
        run = tmp_path / name
        run.mkdir()
        write_report(run, final, Confusion.from_pairs([0], [0], 3), [150, 50, 5], epochs=10,
                     best=best | {"selected_on": "val", "selection_top1": 60.0})
        read = read_run(run)
        assert read["final"]["per_class"] == final["per_class"] == [100.0, 100.0, 50.0]
        assert read["best"]["per_class"] == best["per_class"] and read["best"]["epoch"] == best["epoch"]
        assert read["final"]["label"] == "final epoch (epoch 10/10, test)" and read["best"]["selected_on"] == "val"
    assert read_run(tmp_path / "earlier")["best"]["per_class"] == [100.0, 0.0, 0.0]
    # an older layout: every block carries its own per_class
    old = fake_run(tmp_path / "old", best={"epoch": 9})
    metrics = json.loads((old / "metrics.json").read_text())
    metrics["final"]["per_class"], metrics["best"]["per_class"] = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]
    (old / "metrics.json").write_text(json.dumps(metrics))
    read = read_run(old)
    assert read["final"]["per_class"] == [1.0, 2.0, 3.0] and read["best"]["per_class"] == [4.0, 5.0, 6.0]


def test_the_committed_demo_results_still_read():
    """docs/fmnist_lt_results.json (a results.json of the demo) renders to the table of docs/fmnist_lt_results.md."""
    summary = json.loads((ROOT / "docs" / "fmnist_lt_results.json").read_text())
    table = markdown(summary)
    assert "| CE + rotation SSP | 49.7 ± 2.9 | 88.4 ± 2.9 | 46.0 ± 10.0 | 2.0 ± 3.4 | 16 |" in table
    assert (ROOT / "docs" / "fmnist_lt_results.md").read_text().startswith(table)
