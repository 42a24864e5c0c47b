"""The recipes users type, end to end on tiny data: the whole chain (SSP -> supervised -> pseudo-label ->
joint) on one process and on two, pause / resume of a chain, and the single-stage recipes."""
from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import launch_two_processes, mark_metrics, resumed_at

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "resnet20", "--width", "0.25", "--batch-size", "16", "--warmup-epochs", "0", "--milestones", "",
        "--workers", "1"]
STAGES = ("ce_s0", "rotation_s0", "ce_rotation_ssp_s0", "self_training_u1_s0", "self_training_u100_s0")


def python(*args, timeout=600):
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                            cwd=ROOT)
    return result


def check_chain(out: Path, data: Path):
    for stage in STAGES:
        assert (out / stage / "DONE").exists(), stage
    for pool in ("u1", "u100"):
        assert (out / f"pseudo_{pool}_s0" / "pseudo_labels.npz").exists()
        assert (out / f"pseudo_{pool}_s0" / "data" / "manifest.json").exists()
    ssp = yaml.safe_load((out / "ce_rotation_ssp_s0" / "config.yaml").read_text())
    assert ssp["pretrained"] == str(out / "rotation_s0" / "backbone.pt")
    joint = yaml.safe_load((out / "self_training_u1_s0" / "config.yaml").read_text())
    assert joint["method"] == "supervised" and joint["data"] == str(out / "pseudo_u1_s0" / "data")
    assert yaml.safe_load((out / "ce_s0" / "config.yaml").read_text())["data"] == str(data)
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["CE", "CE + rotation SSP", "CE + self-training (rho_U 1)",
                                                      "CE + self-training (rho_U 100)"]
    assert results["seeds"] == [0]
    table = (out / "results.md").read_text()
    assert "| CE + self-training (rho_U 1) |" in table and "rho_U 100:" in table   # + pseudo-label analysis
    assert (out / "per_class.png").stat().st_size > 0 and (out / "groups.png").stat().st_size > 0


@pytest.mark.slow
def test_fmnist_chain_one_process(tiny_raw, tmp_path):
    out = tmp_path / "chain"
    args = ("recipes/fmnist_lt.py", "--data", tiny_raw, "--out", out, "--epochs", "1", "--seeds", "0",
            "--processes", "2", *TINY)
    r = python(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("[fasttrain] finished ") == 4   # the jobs: ce, two self-training, rotation -> CE
    check_chain(out, tiny_raw)
    # running it again finds every stage done (each job says so in its log) and only prints the table
    again = python(*args)
    logs = "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert again.returncode == 0 and logs.count("already done") == 7


@pytest.mark.slow
def test_fmnist_chain_two_processes(tiny_raw, tmp_path):
    out = tmp_path / "chain2"
    result = launch_two_processes(ROOT / "recipes" / "fmnist_lt.py", "--data", tiny_raw, "--out", out, "--epochs", "1",
                                  "--seeds", "0", *TINY)
    log = result.stdout + result.stderr
    # really distributed: one synchronised run of two ranks (not two independent single-process runs)
    assert log.count("| 2 process(es) on") == 5 and "1 process(es)" not in log
    assert log.count("stage ce_s0 ->") == 1
    check_chain(out, tiny_raw)


@pytest.mark.slow
def test_chain_pauses_and_resumes_the_interrupted_stage(tiny_raw, tmp_path):
    out = tmp_path / "ssp"
    args = ["recipes/ssp_cifar_lt.py", "--data", tiny_raw, "--out", out, "--epochs", "2", "--stages", "rotation,ce",
            *TINY, "--loader", "ffcv"]
    first = python(*args, "--stop-after-epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "paused in stage rotation" in first.stdout and not (out / "rotation" / "DONE").exists()
    before = mark_metrics(out / "rotation")
    second = python(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert resumed_at(second.stdout, out / "rotation") == (1, 5, 0, "last")   # 5 steps per epoch
    assert (out / "rotation" / "metrics.jsonl").read_text().splitlines()[:1] == before
    assert (out / "rotation" / "DONE").exists() and (out / "ce" / "DONE").exists()
    epochs = [json.loads(line)["epoch"] for line in (out / "rotation" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]


@pytest.mark.slow
def test_single_stage_recipes_train_their_preset_with_the_flags_on_top(tiny_raw, tmp_path):
    r = python("recipes/supervised_cifar_lt.py", "--data", tiny_raw, "--out", tmp_path / "ce", "--epochs", "1",
               "--loss", "ldam", "--reweight", "drw", "--sampler", "resample", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = yaml.safe_load((tmp_path / "ce" / "config.yaml").read_text())
    assert (cfg["lr"], cfg["weight_decay"], cfg["schedule"], cfg["milestone_factors"], cfg["loader"]) == \
        (0.1, 2e-4, "step", [0.01, 0.0001], "device")                  # the CIFAR preset
    assert (cfg["epochs"], cfg["arch"], cfg["loss"], cfg["head"], cfg["reweight"], cfg["sampler"]) == \
        (1, "resnet20", "ldam", "auto", "drw", "resample")            # the flags
    assert torch.load(tmp_path / "ce" / "model.pt", weights_only=True)["head"] == "cosine"
    assert json.loads((tmp_path / "ce" / "metrics.json").read_text())["num_eval_images"] == 64
    r = python("recipes/crt_imagenet_lt.py", "--data", tiny_raw, "--out", tmp_path / "crt", "--epochs", "1",
               "--arch", "resnet20", "--batch-size", "16", "--workers", "1", "--precision", "no")
    assert r.returncode != 0 and "--pretrained" in r.stderr
    r = python("recipes/crt_imagenet_lt.py", "--data", tiny_raw, "--out", tmp_path / "crt", "--epochs", "1",
               "--arch", "resnet20", "--width", "0.25", "--batch-size", "16", "--workers", "1", "--precision", "no",
               "--pretrained", tmp_path / "ce" / "backbone.pt", "--loader", "torch")
    assert r.returncode == 0, r.stderr[-3000:]
    crt = yaml.safe_load((tmp_path / "crt" / "config.yaml").read_text())
    assert (crt["method"], crt["sampler"], crt["samples_per_class"], crt["schedule"], crt["lr_ref_batch"]) == \
        ("crt", "class_aware", 4, "cosine", 512)
    assert (crt["batch_size"], crt["loader"]) == (16, "torch")


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.py") if p.name != "presets.py"))
def test_every_recipe_prints_its_help(recipe, monkeypatch, capsys):
    """Run as a user runs it (`python recipes/X.py --help`), in this process: the help and nothing else."""
    monkeypatch.setattr(sys, "argv", [recipe, "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "recipes" / recipe), run_name="__main__")
    assert done.value.code == 0
    assert "--data DIR" in capsys.readouterr().out
