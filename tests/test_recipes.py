"""The recipes users type, end to end on tiny data: the whole chain (SSP -> supervised -> pseudo-label ->
joint) on one process and on two, pause / resume of a chain, and the single-stage recipes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import launch_two_processes

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "resnet20", "--width", "0.25", "--batch-size", "16", "--warmup-epochs", "0", "--milestones", "",
        "--workers", "1"]
STAGES = ("ce", "rotation", "ce_rotation_ssp", "ce_self_training")


def python(*args, timeout=600):
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                            cwd=ROOT)
    return result


def check_chain(out: Path):
    for stage in STAGES:
        assert (out / stage / "DONE").exists(), stage
    assert (out / "pseudo" / "pseudo_labels.npz").exists()
    ssp = yaml.safe_load((out / "ce_rotation_ssp" / "config.yaml").read_text())
    assert ssp["pretrained"] == str(out / "rotation" / "backbone.pt")
    joint = yaml.safe_load((out / "ce_self_training" / "config.yaml").read_text())
    assert joint["method"] == "self_training" and joint["pseudo_labels"].endswith("pseudo/pseudo_labels.npz")
    table = (out / "results.md").read_text()
    assert all(row in table for row in ("| CE |", "| CE + rotation SSP |", "| CE + self-training |"))
    assert (out / "per_class.png").stat().st_size > 0


@pytest.mark.slow
def test_fmnist_chain_one_process(tiny_raw, tmp_path):
    out = tmp_path / "chain"
    r = python("recipes/fmnist_lt.py", "--data", tiny_raw, "--out", out, "--epochs", "1", *TINY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    check_chain(out)
    # running it again finds every stage done and only prints the table
    again = python("recipes/fmnist_lt.py", "--data", tiny_raw, "--out", out, "--epochs", "1", *TINY)
    assert again.returncode == 0 and again.stdout.count("already done") == 4


@pytest.mark.slow
def test_fmnist_chain_two_processes(tiny_raw, tmp_path):
    out = tmp_path / "chain2"
    result = launch_two_processes(ROOT / "recipes" / "fmnist_lt.py", "--data", tiny_raw, "--out", out, "--epochs", "1",
                                  *TINY)
    log = result.stdout + result.stderr
    # really distributed: one synchronised run of two ranks (not two independent single-process runs)
    assert log.count("2 process(es)") == 4 and "1 process(es)" not in log
    assert log.count("stage ce ->") == 1
    check_chain(out)


@pytest.mark.slow
def test_chain_pauses_and_resumes_the_interrupted_stage(tiny_raw, tmp_path):
    out = tmp_path / "ssp"
    args = ["recipes/ssp_cifar_lt.py", "--data", tiny_raw, "--out", out, "--epochs", "2", "--stages", "rotation,ce",
            *TINY, "--loader", "ffcv"]
    first = python(*args, "--stop-after-epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "paused in stage rotation" in first.stdout and not (out / "rotation" / "DONE").exists()
    second = python(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed" in second.stdout + second.stderr
    assert (out / "rotation" / "DONE").exists() and (out / "ce" / "DONE").exists()
    epochs = [json.loads(line)["epoch"] for line in (out / "rotation" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]


@pytest.mark.slow
def test_single_stage_recipes(tiny_raw, tmp_path):
    r = python("recipes/supervised_cifar_lt.py", "--data", tiny_raw, "--out", tmp_path / "ce", "--epochs", "1",
               "--loss", "ldam", "--head", "cosine", "--reweight", "drw", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "ce" / "metrics.json").read_text())["num_eval_images"] == 64
    r = python("recipes/crt_imagenet_lt.py", "--data", tiny_raw, "--out", tmp_path / "crt", "--epochs", "1",
               "--arch", "resnet20", "--batch-size", "16", "--workers", "1", "--precision", "no")
    assert r.returncode != 0 and "--pretrained" in r.stderr
    r = python("recipes/crt_imagenet_lt.py", "--data", tiny_raw, "--out", tmp_path / "crt", "--epochs", "1",
               "--arch", "resnet20", "--width", "0.25", "--batch-size", "16", "--workers", "1", "--precision", "no",
               "--pretrained", tmp_path / "ce" / "backbone.pt", "--loader", "torch")
    assert r.returncode == 0, r.stderr[-3000:]
    for recipe in sorted((ROOT / "recipes").glob("*.py")):
        if recipe.name != "presets.py":
            assert python(recipe, "--help").returncode == 0, recipe.name
