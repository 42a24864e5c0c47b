"""The multi-GPU path, exercised with two CPU processes (gloo): disjoint shards, identical parameters and
BatchNorm statistics, and evaluation that counts every test image once with the model that is saved: a model
that has learned (well above chance, classes told apart) gets the same metrics from the two-process run as
from evaluating its model.pt in one process, and every logit the ranks evaluated with is that model's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import launch_two_processes
from fasttrain.config import Config
from fasttrain.dataset import DatasetDir
from fasttrain.evaluate import evaluate
from fasttrain.data import build_loader
from fasttrain.methods.base import Method

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["device", "ffcv"])
def test_two_processes_train_in_sync_and_evaluate_every_image_once(tiny_raw, tmp_path, loader):
    launch_two_processes(HERE / "scripts" / "train_two_procs.py", tiny_raw, tmp_path, loader)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
    seen0, seen1 = (json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1))
    # 90 training images, 2 ranks x 45, 5 full batches of 8 each: 40 distinct images per rank, disjoint
    assert len(seen0) == len(set(seen0)) == 40 and len(seen1) == len(set(seen1)) == 40
    assert not set(seen0) & set(seen1)
    # metrics of the 2-process run equal those of evaluating the saved model in one process
    two = json.loads((tmp_path / "run" / "metrics.json").read_text())
    cfg = Config(data=str(tiny_raw), arch="resnet20", width=0.5)
    dataset = DatasetDir(tiny_raw)
    method = Method(cfg, dataset)
    model = method.build_model()
    model.load_state_dict(torch.load(tmp_path / "run" / "model.pt", weights_only=True)["state_dict"])
    loader1 = build_loader(dataset, "test", kind="device", batch_size=16, views=method.views(False), train=False,
                           workers=1)
    one, _ = evaluate(model, loader1, 4, dataset.split("train").class_counts)
    assert two["num_eval_images"] == 64
    assert two["top1"] >= 60 and len(set(two["per_class"])) > 1, two    # chance is 25%
    for key in ("top1", "top5", "many", "medium", "few", "per_class"):
        assert two[key] == one[key], key
    # finer than predictions: every logit the ranks evaluated with is the saved model's (BatchNorm statistics
    # averaged over the ranks BEFORE the evaluation; each rank's own statistics move logits by ~1e-2)
    logits = {int(i): row for r in (0, 1) for i, row in json.loads((tmp_path / f"logits{r}.json").read_text()).items()}
    model.eval()
    loader1.set_epoch(0)
    assert sorted(logits) == sorted(torch.cat([b.indices for b in loader1]).tolist())   # the 64 test images
    with torch.no_grad():
        for batch in loader1:
            saved = model(batch.images).float()
            for i, row in zip(batch.indices.tolist(), saved):
                assert torch.allclose(torch.tensor(logits[i]), row, atol=1e-4), (i, logits[i], row.tolist())
