"""`python -m fasttrain.evaluate` on a trained run's model.pt reproduces the run's own final metrics and
confusion matrix, writes the same files, gives the same results on two processes as on one, and turns user
mistakes into one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TRAIN_COUNTS, _split, fit, launch_two_processes

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("top1", "top5", "many", "medium", "few", "per_class", "num_eval_images", "train_class_counts")


@pytest.fixture(scope="module")
def trained_run(tiny_raw, tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    assert fit(tiny_raw, run, epochs=2) == "done"
    return run


def test_evaluate_checkpoint_equals_the_runs_final_metrics(tiny_raw, trained_run, tmp_path):
    from fasttrain.confusion import Confusion
    from fasttrain.evaluate import evaluate_checkpoint
    metrics, out = evaluate_checkpoint(tiny_raw, trained_run / "model.pt", loader="ffcv", batch_size=7,
                                       out=tmp_path / "ev", workers=1)
    own = json.loads((trained_run / "metrics.json").read_text())
    written = json.loads((out / "metrics.json").read_text())
    for key in KEYS:
        assert written[key] == own[key] == metrics[key], key
    assert written["split"] == "test" and written["checkpoint"].endswith("model.pt")
    np.testing.assert_array_equal(Confusion.load(out / "confusion.npz").dense(),
                                  Confusion.load(trained_run / "confusion.npz").dense())
    assert sorted(p.name for p in out.iterdir()) == ["confusion.npz", "metrics.json", "per_class.png"]
    assert Image.open(out / "per_class.png").text["Title"].startswith("test accuracy per class")


def test_the_runs_confusion_file_is_the_dense_matrix_of_a_dense_computation(tiny_raw, trained_run):
    """confusion.npz of a training run, read back with numpy alone, equals the dense C x C matrix built with
    index_put_ into zeros for the run's final model on its test split."""
    import torch

    from fasttrain.config import Config
    from fasttrain.data import build_loader
    from fasttrain.dataset import DatasetDir
    from fasttrain.methods.base import Method
    dataset = DatasetDir(tiny_raw)
    method = Method(Config.load(trained_run / "config.yaml"), dataset)
    model = method.build_model().eval()
    model.load_state_dict(torch.load(trained_run / "model.pt", weights_only=True)["state_dict"])
    dense = torch.zeros(4, 4, dtype=torch.long)
    with build_loader(dataset, "test", kind="torch", batch_size=9, views=method.views(train=False), train=False,
                      workers=1) as loader, torch.no_grad():
        loader.set_epoch(0)
        for batch in loader:
            dense.index_put_((batch.labels, model(batch.images).argmax(1)), torch.ones_like(batch.labels),
                             accumulate=True)
    with np.load(trained_run / "confusion.npz") as z:
        matrix = np.zeros(z["shape"], dtype=np.int64)
        matrix[z["rows"], z["cols"]] = z["counts"]
    np.testing.assert_array_equal(matrix, dense.numpy())
    assert matrix.sum() == 64 and not (trained_run / "confusion.npy").exists()
    m = json.loads((trained_run / "metrics.json").read_text())
    assert m["per_class"] == [100 * matrix[c, c] / 16 for c in range(4)]


@pytest.fixture(scope="module")
def odd_test_set(tmp_path_factory):
    """tiny_raw's classes and image format with 63 test images: two ranks evaluate 32 and 31."""
    from data_prep.convert import write_dataset
    rng = np.random.default_rng(5)
    return write_dataset(tmp_path_factory.mktemp("odd") / "data",
                         {"train": _split(TRAIN_COUNTS, rng, 0), "test": _split([16, 16, 16, 15], rng, 20_000)},
                         num_classes=4, encoding="raw", formats=("dali",), shard_size=64, workers=1)


@pytest.mark.slow
def test_two_processes_evaluate_like_one(odd_test_set, trained_run, tmp_path):
    from fasttrain.confusion import Confusion
    from fasttrain.evaluate import evaluate_checkpoint
    args = ["--data", odd_test_set, "--checkpoint", trained_run, "--loader", "torch", "--batch-size", "8",
            "--workers", "1"]
    launch_two_processes(ROOT / "tests" / "scripts" / "evaluate_cli.py", *args, "--out", tmp_path / "two")
    evaluate_checkpoint(odd_test_set, trained_run, loader="torch", batch_size=8, workers=1, out=tmp_path / "one")
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert two == one and two["num_eval_images"] == 63
    a, b = Confusion.load(tmp_path / "one" / "confusion.npz"), Confusion.load(tmp_path / "two" / "confusion.npz")
    for field in ("rows", "cols", "counts"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert b.counts.sum() == 63 and (b.totals() == [16, 16, 16, 15]).all()


@pytest.mark.slow
def test_command_line_and_user_errors(tiny_raw, trained_run, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "fasttrain.evaluate", *map(str, args)], capture_output=True,
                              text=True, cwd=ROOT)
    ok = run("--data", tiny_raw, "--checkpoint", trained_run, "--loader", "device", "--workers", "1")
    assert ok.returncode == 0, ok.stderr[-3000:]
    default_out = trained_run / "eval_test" / "metrics.json"
    assert json.loads(default_out.read_text())["top1"] == json.loads((trained_run / "metrics.json").read_text())["top1"]
    assert "test: top1" in ok.stdout and "confusion.npz" in ok.stdout
    bad = run("--data", tiny_raw, "--checkpoint", tmp_path / "nope.pt")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --checkpoint") and "Traceback" not in bad.stderr
    bad = run("--data", tiny_raw, "--checkpoint", trained_run / "model.pt", "--split", "val", "--workers", "1")
    assert bad.returncode == 2 and "no split 'val'" in bad.stderr and "Traceback" not in bad.stderr
    assert not (trained_run / "eval_val").exists()                     # nothing half-written
