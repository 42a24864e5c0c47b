"""No host synchronisation inside a training step: for every method and every loader's stage 2, count the
operations that force a device-to-host sync or bring host data into the step (tests/sync_counter.py) over
whole epochs of the engine's own `train_epoch`. Budget: 0 per step; exactly one read-back on a log step
(progress bar and trackers: `log_every`) and exactly one at the end of the epoch (the epoch means). Each kind
of sync the counter knows is injected into a real step once, and must be caught."""
from __future__ import annotations

import sys
import threading

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

LOG_EVERY = 2
BATCH = 16                        # 90 training images: 5 steps, log steps 1, 3 and 4 (the last)
# The method matrix: one line of config overrides each ({joint} / {backbone}: files made by the fixtures).
METHODS = [
    ("ce", {}),
    ("ldam_drw", dict(loss="ldam", head="cosine", reweight="drw", drw_epoch=1)),
    ("cb_focal", dict(loss="focal", reweight="cb")),
    ("balanced_sampler", dict(sampler="balanced")),
    ("logit_adjust_bf16", dict(loss="logit_adjust", precision="bf16")),
    # with the GPU's GradScaler + fused SGD (see emulate_gpu_fp16); the emulated steps' values are not a training
    # run's (its loss turns NaN after a few steps), so the run goes on past a non-finite loss: only syncs count here
    ("ce_fp16_gradscaler", dict(precision="fp16", nonfinite_loss="continue")),
    ("ce_grad_accum", dict(grad_accum=2, batch_size=22)),   # 4 micro-batches: 2 optimiser steps
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
    """Phases off the budget: 0 per step, exactly 1 on a log step, exactly 1 at the end of the epoch."""
    bad = {}
    for phase in [*range(steps), "end"]:
        ops = events.get(phase, {})
        expected = 1 if phase == "end" or (phase + 1) % LOG_EVERY == 0 or phase + 1 == steps else 0
        if sum(ops.values()) != expected:
            bad[phase] = dict(ops)
    return bad


def emulate_gpu_fp16(engine: Engine) -> None:
    """--precision fp16 as Accelerate sets it up on a GPU: a GradScaler and fp16 autocast around the model's
    forward; and the fused SGD the engine builds on CUDA. On a CPU device Accelerate (1.x) sets up neither: it
    trains fp16 runs in fp32 (no autocast, `Accelerator.scaler` None), so the scaler's step is installed here."""
    from accelerate.optimizer import patch_optimizer_step
    acc, optimizer = engine.accelerator, engine.optimizer
    assert acc.scaler is None and not acc.native_amp, "Accelerate now sets up fp16 on the CPU: drop this emulation"
    scaler = torch.amp.GradScaler("cpu")
    acc.scaler, acc.native_amp, optimizer.scaler = scaler, True, scaler
    optimizer._accelerate_step_called = False
    optimizer._optimizer_original_step_method = optimizer.optimizer.step
    optimizer._optimizer_patched_step_method = patch_optimizer_step(optimizer, optimizer.optimizer.step)
    fuse_sgd(optimizer.optimizer)
    model = acc.unwrap_model(engine.model)
    model.forward = torch.autocast("cpu", dtype=torch.float16)(model.forward)


def fuse_sgd(sgd: torch.optim.SGD) -> None:
    """The engine's SGD as on CUDA (`fused=True`): the GradScaler hands it found_inf on the device."""
    for group in sgd.param_groups:
        group["fused"] = True
    sgd._step_supports_amp_scaling = True


def make_engine(data, out, overrides, files, loader="device"):
    overrides = {k: v.format(**files) if isinstance(v, str) else v for k, v in overrides.items()}
    cfg = Config(data=str(data), out=str(out)).update(TINY_RUN | dict(epochs=2, batch_size=BATCH, log_every=LOG_EVERY,
                                                                      loader=loader) | overrides)
    engine = Engine(cfg)
    if cfg.precision == "fp16":
        emulate_gpu_fp16(engine)
    return engine


@pytest.mark.parametrize("name,overrides", METHODS, ids=[m[0] for m in METHODS])
def test_every_method_steps_without_host_sync(tiny_raw, tmp_path, files, name, overrides):
    engine = make_engine(tiny_raw, tmp_path / name, overrides, files)
    try:
        steps = len(engine.train_loader)
        assert steps >= 4 and steps > LOG_EVERY + 1           # log steps and steps without a read
        events = epoch_events(engine, 1)                      # epoch 1: ldam_drw re-weighted (drw_epoch 1)
        assert over_budget(events, steps) == {}, f"{name}: {events}"
        if name == "ce_fp16_gradscaler":       # the scaler's inf check ran (on the device): fp16 overflowed at
            assert engine.accelerator.scaler.get_scale() < 2.0 ** 16      # the initial scale, which it lowered
        if name == "ce_grad_accum":
            assert engine.state["step"] == steps // 2         # the optimiser stepped every second micro-batch
    finally:
        reset_accelerate()


LEAKS = {   # name: (what the step does additionally, the event the counter must record)
    "item": (lambda loss, b: loss.item(), "_local_scalar_dense"),
    "float": (lambda loss, b: float(loss.detach()), "_local_scalar_dense"),
    "bool": (lambda loss, b: bool(loss > 0), "_local_scalar_dense"),
    "tolist": (lambda loss, b: b.labels.tolist(), "tolist"),
    "cpu": (lambda loss, b: loss.detach().cpu(), "cpu"),
    "to_cpu": (lambda loss, b: loss.detach().to("cpu"), "to[cpu]"),
    "to_cpu_device_non_blocking": (lambda loss, b: b.labels.to(torch.device("cpu"), non_blocking=True), "to[cpu]"),
    "numpy": (lambda loss, b: b.labels.numpy(), "numpy"),
    "np_asarray": (lambda loss, b: np.asarray(b.labels), "numpy"),
    "nonzero": (lambda loss, b: b.labels.nonzero(), "nonzero"),
    "where_mask": (lambda loss, b: torch.where(b.labels > 0), "nonzero"),
    "bool_mask": (lambda loss, b: b.images[b.labels > 0], "index[bool mask]"),
    "unique": (lambda loss, b: b.labels.unique(), "_unique2"),
    "host_tensor": (lambda loss, b: torch.tensor([1.0]), "lift_fresh"),
    "from_numpy": (lambda loss, b: torch.from_numpy(np.ones(4)), "lift_fresh"),
    "cuda_synchronize": (lambda loss, b: torch.cuda.synchronize(), "cuda.synchronize"),
    "stream_synchronize": (lambda loss, b: torch.cuda.Stream.synchronize(None), "Stream.synchronize"),
    "event_synchronize": (lambda loss, b: torch.cuda.Event.synchronize(None), "Event.synchronize"),
    "accelerator_synchronize": (lambda loss, b: torch.accelerator.synchronize(), "accelerator.synchronize"),
    "item_in_another_thread": (lambda loss, b: in_thread(loss.detach().item), "_local_scalar_dense[thread]"),
}


def in_thread(fn) -> None:
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join()


@pytest.mark.parametrize("kind", LEAKS)
def test_the_counter_catches_each_kind_of_sync_in_a_step(tiny_raw, tmp_path, files, monkeypatch, kind):
    """The budget can fail: each kind of sync, put into the loss of every step, shows in every step."""
    from fasttrain.methods.supervised import Supervised
    real, (leak, event) = Supervised.loss, LEAKS[kind]

    def leaky(self, model, batch, epoch):
        loss, logs = real(self, model, batch, epoch)
        leak(loss, batch)
        return loss, logs

    monkeypatch.setattr(Supervised, "loss", leaky)
    engine = make_engine(tiny_raw, tmp_path / "leaky", {}, files)
    events = epoch_events(engine, 0)
    bad = over_budget(events, len(engine.train_loader))
    assert set(bad) >= set(range(len(engine.train_loader))), events
    assert all(event in bad[step] for step in range(len(engine.train_loader))), events


def test_the_counter_catches_a_sync_in_the_device_loaders_gather(tiny_raw, tmp_path, files, monkeypatch):
    """The device loader's stage 1 (its gather from the resident split) runs on the device and is counted."""
    from fasttrain.data.device_loader import DeviceLoader
    real = DeviceLoader._decoded

    def leaky(self, positions):
        for views in real(self, positions):
            views[0].sum().item()
            yield views

    monkeypatch.setattr(DeviceLoader, "_decoded", leaky)
    engine = make_engine(tiny_raw, tmp_path / "leaky", {}, files)
    events = epoch_events(engine, 0)
    steps = len(engine.train_loader)
    bad = over_budget(events, steps)          # the gather of step k comes before its stage 2: counted in k - 1
    assert set(bad) >= set(range(steps - 1)) and "_local_scalar_dense" in bad[0], events


def test_a_gradscaler_without_a_fused_optimizer_syncs_every_step(tiny_raw, tmp_path, files, monkeypatch):
    """Why fp16 needs the fused optimizer: GradScaler.step of any other optimizer reads found_inf on the host
    (`.item()`) before every step. The engine's SGD is fused on CUDA; apex LAMB / LARS are not."""
    monkeypatch.setattr(sys.modules[__name__], "fuse_sgd", lambda sgd: None)
    engine = make_engine(tiny_raw, tmp_path / "unfused", dict(precision="fp16"), files)
    events = epoch_events(engine, 0)
    steps = len(engine.train_loader)
    assert set(over_budget(events, steps)) >= set(range(steps))
    assert all(events[step]["_local_scalar_dense"] >= 1 for step in range(steps)), events


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
