"""Nothing grows with the epoch count: native threads, open file descriptors, child processes and live DALI
pipelines are the same after 3 more epochs (training + evaluation each epoch) as after the warm-up epochs,
for every loader kind and a representative set of methods; DALI builds each pipeline once."""
from __future__ import annotations

import gc
import os
import time

import numpy as np
import psutil
import pytest

from fasttrain.config import Config
from fasttrain.dataset import DatasetDir
from fasttrain.engine import Engine

from conftest import TINY_RUN, reset_accelerate

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

MATRIX = [   # (loader, config overrides)
    ("ffcv", {}),
    ("dali", {}),
    ("torch", {}),
    ("device", {}),
    ("dali", dict(method="moco", moco_queue=64, moco_shuffle_groups=2)),
    ("ffcv", dict(data="{joint}", sampler="balanced")),   # self-training's joint stage
]


def resources() -> dict:
    from nvidia.dali import Pipeline
    return {"threads": len(os.listdir("/proc/self/task")), "fds": len(os.listdir("/proc/self/fd")),
            "children": len(psutil.Process().children(recursive=True)),
            "dali_pipelines": sum(issubclass(type(o), Pipeline) for o in gc.get_objects())}  # type(): no weakproxy errors


def stable(seconds: float = 5.0) -> dict:
    """The resources once two reads 0.6 s apart agree (a thread told to stop checks every 0.5 s)."""
    deadline, now = time.monotonic() + seconds, resources()
    while time.monotonic() < deadline:
        time.sleep(0.6)
        now, previous = resources(), now
        if now == previous:
            break
    return now


def settled(expected: dict, seconds: float = 3.0) -> dict:
    """The resources once threads that were told to stop (an FFCV epoch left early) have exited."""
    deadline = time.monotonic() + seconds
    now = resources()
    while now != expected and time.monotonic() < deadline:
        time.sleep(0.1)
        now = resources()
    return now


@pytest.fixture(scope="module")
def pseudo(tiny_raw, tmp_path_factory):
    split = DatasetDir(tiny_raw).split("unlabeled")
    path = tmp_path_factory.mktemp("leaks") / "pseudo.npz"
    np.savez(path, position=np.arange(split.num_samples), source_index=split.source_index,
             label=np.arange(split.num_samples) % 4, confidence=np.ones(split.num_samples, np.float32),
             threshold=np.float32(0))
    from fasttrain.pseudo_label import write_pseudo_dataset
    return str(write_pseudo_dataset(tiny_raw, path, path.parent / "joint", workers=1))


def run_epochs(engine: Engine, epochs: range) -> None:
    for epoch in epochs:
        engine.train_epoch(epoch)
        if engine.eval_loader is not None:
            engine.evaluate(epoch)


@pytest.mark.parametrize("loader,overrides", MATRIX, ids=[f"{k}-{o.get('method', 'joint' if 'data' in o else 'supervised')}" for k, o in MATRIX])
def test_resources_do_not_grow_with_epochs(tiny_raw, tmp_path, pseudo, loader, overrides):
    overrides = {k: v.format(joint=pseudo) if isinstance(v, str) else v for k, v in overrides.items()}
    cfg = Config(data=str(tiny_raw), out=str(tmp_path / "run")).update(
        TINY_RUN | dict(epochs=6, batch_size=32, loader=loader) | overrides)
    engine = Engine(cfg)
    try:
        run_epochs(engine, range(0, 1))                      # warm-up: pools, workers, pipelines start
        before = stable()
        run_epochs(engine, range(1, 4))
        after = settled(before)
        assert after == before, f"grew over 3 epochs: {before} -> {after}"
        if loader == "dali":
            loaders = [engine.train_loader, engine.eval_loader]
            assert [ld.pipelines_built for ld in loaders if ld is not None] == [1] * sum(ld is not None
                                                                                        for ld in loaders)
    finally:
        del engine
        reset_accelerate()


def loader_workers(exclude: set[int]) -> list[int]:
    """Live processes below this one, but those in `exclude` and the multiprocessing fork server itself
    (it lives as long as the process; the torch loader's workers are its children)."""
    me = psutil.Process()
    server = {p.pid for p in me.children() if "multiprocessing.forkserver" in " ".join(p.cmdline())}
    return [p.pid for p in me.children(recursive=True) if p.pid not in exclude | server
            and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_a_finished_run_releases_its_loaders(tiny_raw, tmp_path, loader):
    """fit() returns with the loaders' worker processes and pipelines gone, while the engine is still
    referenced (a chain runs its next stage in the same process; garbage collection may come much later)."""
    from nvidia.dali import Pipeline
    gc.collect()
    earlier = {p.pid for p in psutil.Process().children(recursive=True)}
    cfg = Config(data=str(tiny_raw), out=str(tmp_path / "run")).update(TINY_RUN | dict(epochs=2, loader=loader,
                                                                                       workers=2))
    engine = Engine(cfg)
    try:
        engine.train_epoch(0)
        engine.evaluate(0)
        running = loader_workers(earlier)
        pipelines = [o for o in gc.get_objects() if issubclass(type(o), Pipeline)]
        assert (len(running), len(pipelines)) == ((4, 0) if loader == "torch" else (0, 2))
        del pipelines
        assert engine.fit() == "done"
        assert loader_workers(earlier) == []
        assert sum(issubclass(type(o), Pipeline) for o in gc.get_objects()) == 0
    finally:
        del engine
        reset_accelerate()
