"""No host synchronisation inside a training step (CONTRACTS C4): for every method and every loader's stage 2,
count the operations that force a device-to-host sync or bring host data into the step (tests/sync_counter.py)
over whole epochs of the engine's own `train_epoch`. Budget: 0 per step; one read-back on a log step
(progress bar: `log_every`) and one at the end of the epoch (the epoch means)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fasttrain.config import Config
from fasttrain.data import augment as A
from fasttrain.data import build_loader
from fasttrain.dataset import DatasetDir
from fasttrain.engine import Engine

from conftest import TINY_RUN, reset_accelerate
from sync_counter import SyncCounter

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

LOG_EVERY = 3
# The method matrix: one line of config overrides each ({pseudo} / {backbone}: files made by the fixtures).
METHODS = [
    ("ce", {}),
    ("ldam_drw", dict(loss="ldam", head="cosine", reweight="drw", drw_epoch=1)),
    ("cb_focal", dict(loss="focal", reweight="cb")),
    ("balanced_sampler", dict(sampler="balanced")),
    ("logit_adjust_bf16", dict(loss="logit_adjust", precision="bf16")),
    ("rotation", dict(method="rotation")),
    ("moco_v2", dict(method="moco", moco_queue=48, moco_shuffle_groups=2)),
    ("self_training_joint", dict(data="{joint}")),   # supervised on labeled + pseudo-labeled data
    ("crt", dict(method="crt", pretrained="{backbone}", sampler="balanced")),
]


@pytest.fixture(scope="module")
def files(tiny_raw, tmp_path_factory):
    """A random pseudo-label table and the labeled + pseudo-labeled dataset made from it (the cost of
    self-training does not depend on the labels), and a backbone file."""
    from fasttrain.models import build_model
    from fasttrain.pseudo_label import write_pseudo_dataset
    from fasttrain.models.checkpoint import save_backbone
    root = tmp_path_factory.mktemp("sync")
    split = DatasetDir(tiny_raw).split("unlabeled")
    rng = np.random.default_rng(0)
    np.savez(root / "pseudo.npz", position=np.arange(split.num_samples), source_index=split.source_index,
             label=rng.integers(0, 4, split.num_samples), confidence=np.ones(split.num_samples, np.float32),
             threshold=np.float32(0))
    save_backbone(build_model("resnet20", 4, width=0.5), root / "backbone.pt")
    joint = write_pseudo_dataset(tiny_raw, root / "pseudo.npz", root / "joint", workers=1)
    return {"pseudo": str(root / "pseudo.npz"), "backbone": str(root / "backbone.pt"), "joint": str(joint)}


def epoch_events(engine: Engine, epoch: int) -> dict:
    """Sync events of one `train_epoch`, by phase: 'setup', step 0, 1, ..., 'end'."""
    counter = SyncCounter()
    counter.mark_steps(engine.train_loader)
    sync_buffers = engine.sync_buffers

    def end_of_loop():
        counter.phase = "end"
        sync_buffers()

    engine.sync_buffers = end_of_loop
    with counter.watch_loaders(), counter.counting():
        engine.train_epoch(epoch)
    engine.sync_buffers = sync_buffers
    return counter.by_phase()


def over_budget(events: dict, steps: int) -> dict:
    """Phases that exceed the budget: 0 per step, 1 on a log step, 1 at the end of the epoch."""
    bad = {}
    for phase, ops in events.items():
        if phase == "setup":
            continue
        log_step = phase == "end" or (phase + 1) % LOG_EVERY == 0 or phase + 1 == steps
        if sum(ops.values()) > (1 if log_step else 0):
            bad[phase] = dict(ops)
    return bad


def make_engine(data, out, overrides, files, loader="device"):
    overrides = {k: v.format(**files) if isinstance(v, str) else v for k, v in overrides.items()}
    cfg = Config(data=str(data), out=str(out)).update(TINY_RUN | dict(epochs=2, batch_size=24, log_every=LOG_EVERY, loader=loader)
                                                      | overrides)
    return Engine(cfg)


@pytest.mark.parametrize("name,overrides", METHODS, ids=[m[0] for m in METHODS])
def test_every_method_steps_without_host_sync(tiny_raw, tmp_path, files, name, overrides):
    engine = make_engine(tiny_raw, tmp_path / name, overrides, files)
    try:
        steps = len(engine.train_loader)
        assert steps >= 3
        events = epoch_events(engine, 1)                      # epoch 1: ldam_drw re-weighted (drw_epoch 1)
        assert over_budget(events, steps) == {}, f"{name}: {events}"
        assert sum(k != "setup" for k in events) <= steps // LOG_EVERY + 2   # log steps + end only
    finally:
        reset_accelerate()


def test_the_counter_catches_a_sync_in_a_step(tiny_raw, tmp_path, files, monkeypatch):
    """The budget can fail: `.item()`, `.tolist()`, `.cpu()`, a boolean mask and host data in a loss."""
    from fasttrain.methods.supervised import Supervised
    real = Supervised.loss

    def leaky(self, model, batch, epoch):
        loss, logs = real(self, model, batch, epoch)
        loss.item(), batch.labels.tolist(), batch.labels.cpu()
        batch.labels[batch.labels > 0], torch.tensor([1.0])
        return loss, logs

    monkeypatch.setattr(Supervised, "loss", leaky)
    engine = make_engine(tiny_raw, tmp_path / "leaky", {}, files)
    events = epoch_events(engine, 0)
    bad = over_budget(events, len(engine.train_loader))
    assert set(bad) >= set(range(len(engine.train_loader)))
    assert set(bad[0]) >= {"_local_scalar_dense", "tolist", "cpu", "index[bool mask]", "lift_fresh"}


# ---------------------------------------------------------------- each loader's stage 2, raw and jpeg sets


@pytest.fixture(scope="module")
def jpeg_set(tmp_path_factory):
    from data_prep.convert import write_dataset
    from test_loaders import smooth_jpeg
    rng = np.random.default_rng(1)
    labels = np.arange(24) % 4
    split = {"images": [smooth_jpeg(rng, y) for y in labels], "labels": labels, "source_index": np.arange(24)}
    return DatasetDir(write_dataset(tmp_path_factory.mktemp("jpeg") / "ds", {"train": split, "test": split},
                                    num_classes=4, encoding="jpeg", max_side=64, shard_size=16, workers=1))


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
@pytest.mark.parametrize("kind", ["ffcv", "dali", "torch", "device"])
def test_loader_stage2_has_no_host_sync(tiny_raw, jpeg_set, kind, encoding):
    ds = DatasetDir(tiny_raw) if encoding == "raw" else jpeg_set
    views = [A.small_train(), A.moco_v2(16)] if encoding == "raw" else [A.large_train(24), A.moco_v2(16)]
    loader = build_loader(ds, "train", kind=kind, batch_size=8, views=views, train=True, workers=1,
                          sampler="balanced")
    counter = SyncCounter()
    counter.mark_steps(loader)
    batches = 0
    with counter.watch_loaders(), counter.counting():
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            for batch in loader:
                batches += 1
    assert batches == 2 * len(loader) >= 4
    assert counter.events == [], counter.by_phase()
