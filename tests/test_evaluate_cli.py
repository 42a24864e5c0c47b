"""`python -m fasttrain.evaluate` on a trained run's model.pt reproduces the run's own final metrics, writes
the same files, and turns user mistakes into one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import fit

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("top1", "top5", "many", "medium", "few", "per_class", "num_eval_images", "train_class_counts")


@pytest.fixture(scope="module")
def trained_run(tiny_raw, tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    assert fit(tiny_raw, run, epochs=2) == "done"
    return run


def test_evaluate_checkpoint_equals_the_runs_final_metrics(tiny_raw, trained_run, tmp_path):
    from fasttrain.evaluate import evaluate_checkpoint
    metrics, out = evaluate_checkpoint(tiny_raw, trained_run / "model.pt", loader="ffcv", batch_size=7,
                                       out=tmp_path / "ev", workers=1)
    own = json.loads((trained_run / "metrics.json").read_text())
    written = json.loads((out / "metrics.json").read_text())
    for key in KEYS:
        assert written[key] == own[key] == metrics[key], key
    assert written["split"] == "test" and written["checkpoint"].endswith("model.pt")
    np.testing.assert_array_equal(np.load(out / "confusion.npy"), np.load(trained_run / "confusion.npy"))
    assert (out / "per_class.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_command_line_and_user_errors(tiny_raw, trained_run, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "fasttrain.evaluate", *map(str, args)], capture_output=True,
                              text=True, cwd=ROOT)
    ok = run("--data", tiny_raw, "--checkpoint", trained_run, "--loader", "device", "--workers", "1")
    assert ok.returncode == 0, ok.stderr[-3000:]
    default_out = trained_run / "eval_test" / "metrics.json"
    assert json.loads(default_out.read_text())["top1"] == json.loads((trained_run / "metrics.json").read_text())["top1"]
    assert "test: top1" in ok.stdout
    bad = run("--data", tiny_raw, "--checkpoint", tmp_path / "nope.pt")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --checkpoint") and "Traceback" not in bad.stderr
    bad = run("--data", tiny_raw, "--checkpoint", trained_run / "model.pt", "--split", "val", "--workers", "1")
    assert bad.returncode == 2 and "no split 'val'" in bad.stderr and "Traceback" not in bad.stderr
