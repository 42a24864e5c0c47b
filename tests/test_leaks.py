"""Nothing grows with the epoch count: native threads, open file descriptors, child processes, memory-mapped
data files and live DALI pipelines are the same after 2 more epochs of `fit()` (training, evaluation, the
checkpoints and the TensorBoard tracker of each epoch) as after the warm-up epochs, for every loader kind and a
representative set of methods; DALI builds each pipeline once. When `fit()` returns, every loader kind has let
go of its worker processes, threads, pipelines and file mappings, and the tracker of its writer thread."""
from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np
import psutil
import pytest

from fasttrain.config import Config
from fasttrain.dataset import DatasetDir
from fasttrain.engine import Engine

from conftest import TINY_RUN, reset_accelerate

MATRIX = [   # (loader, config overrides)
    ("ffcv", {}),
    ("dali", {}),
    ("torch", {}),
    ("device", {}),
    ("dali", dict(method="moco", moco_queue=64, moco_shuffle_groups=2)),
    ("ffcv", dict(data="{joint}", sampler="balanced")),   # self-training's joint stage
]


def data_maps() -> list[str]:
    """Data files mapped into this process (FFCV's .beton, the DALI shards)."""
    with open("/proc/self/maps") as f:
        return sorted(line.split()[-1] for line in f if line.rstrip().endswith((".beton", ".tar", ".idx")))


def resources() -> dict:
    from nvidia.dali import Pipeline
    return {"threads": len(os.listdir("/proc/self/task")), "fds": len(os.listdir("/proc/self/fd")),
            "children": len(psutil.Process().children(recursive=True)), "data_maps": len(data_maps()),
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


@pytest.mark.parametrize("loader,overrides", MATRIX, ids=[f"{k}-{o.get('method', 'joint' if 'data' in o else 'supervised')}" for k, o in MATRIX])
def test_resources_do_not_grow_with_epochs(tiny_raw, tmp_path, pseudo, loader, overrides):
    overrides = {k: v.format(joint=pseudo) if isinstance(v, str) else v for k, v in overrides.items()}
    cfg = Config(data=str(tiny_raw), out=str(tmp_path / "run")).update(
        TINY_RUN | dict(epochs=4, batch_size=32, loader=loader, log_with="tensorboard", log_every=1) | overrides)
    engine = Engine(cfg)
    measured, save_checkpoint = {}, engine.save_checkpoint

    def save_and_measure(name: str) -> None:            # at the end of an epoch, after its checkpoint
        save_checkpoint(name)
        epoch = engine.state["epoch"]
        if name == "last" and epoch == 1:               # warm-up done: pools, workers, pipelines started
            measured["before"] = stable()
        elif name == "last" and epoch == 3:
            measured["after"] = settled(measured["before"])

    engine.save_checkpoint = save_and_measure
    try:
        assert engine.fit() == "done"
        assert measured["after"] == measured["before"], f"grew over 2 epochs: {measured}"
        assert measured["before"]["data_maps"] > 0 or loader in ("device", "torch")
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


def python_threads() -> set[str]:
    return {f"{t.name} ({type(t).__name__})" for t in threading.enumerate() if t.is_alive()}


@pytest.mark.parametrize("loader", ["torch", "dali", "ffcv"])
def test_a_finished_run_releases_its_loaders(tiny_raw, tmp_path, loader):
    """fit() returns with the loaders' worker processes, pipelines, epoch threads and file mappings gone, and the
    tracker's writer thread stopped, while the engine is still referenced (a chain runs its next stage in the
    same process; garbage collection may come much later). The loaders stay usable."""
    from nvidia.dali import Pipeline
    gc.collect()
    earlier, threads = {p.pid for p in psutil.Process().children(recursive=True)}, python_threads()
    cfg = Config(data=str(tiny_raw), out=str(tmp_path / "run")).update(TINY_RUN | dict(
        epochs=2, loader=loader, workers=2, log_with="tensorboard"))
    engine = Engine(cfg)
    try:
        engine.train_epoch(0)
        engine.evaluate(0)
        running = loader_workers(earlier)
        pipelines = [o for o in gc.get_objects() if issubclass(type(o), Pipeline)]
        assert (len(running), len(pipelines)) == {"torch": (4, 0), "dali": (0, 2), "ffcv": (0, 0)}[loader]
        assert bool(data_maps()) is (loader != "torch")        # the torch loader reads in its workers
        del pipelines
        assert engine.fit() == "done"
        assert loader_workers(earlier) == []
        assert sum(issubclass(type(o), Pipeline) for o in gc.get_objects()) == 0
        if loader != "dali":                  # DALI's shard reader keeps its tars mapped until it is collected
            assert data_maps() == []
        assert python_threads() - threads <= {"tqdm_monitor (TMonitor)"}, python_threads() - threads
        engine.train_loader.set_epoch(1)                           # usable again: the next epoch starts them
        assert sum(len(batch) for batch in engine.train_loader) == len(engine.train_loader) * 16
        engine.close()
        assert loader_workers(earlier) == [] and (loader == "dali" or data_maps() == [])
    finally:
        del engine
        reset_accelerate()
