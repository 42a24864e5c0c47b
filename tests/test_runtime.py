"""Per-process resources, math settings, --sync-bn and the device loader's memory guard."""
from __future__ import annotations

import pytest
import torch

from fasttrain import runtime
from fasttrain.config import Config
from fasttrain.data import augment as A
from fasttrain.data import base, build_loader, device_loader
from fasttrain.dataset import DatasetDir, DatasetError
from fasttrain.engine import Engine
from fasttrain.models import build_model

from conftest import TINY_RUN


@pytest.fixture
def node(monkeypatch):
    """A 64-core node with 8 processes on it."""
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_each_process_gets_its_share_of_the_cores(node, tiny_raw):
    assert runtime.local_world_size() == 8 and runtime.cores_per_process() == 8
    assert base.default_workers() == 8
    loader = build_loader(DatasetDir(tiny_raw), "test", kind="device", batch_size=8, views=[A.small_eval()],
                          train=False)
    assert loader.workers == 8                                   # not 64
    threads = torch.get_num_threads()
    try:
        used = runtime.configure_threads(0)
        assert used == {"cores_per_process": 8, "local_processes": 8, "loader_workers": 8, "torch_threads": 8}
    finally:
        torch.set_num_threads(threads)


def test_engine_prints_what_each_process_uses_once(node, tiny_raw, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        Engine(Config(data=str(tiny_raw), out=str(tmp_path)).update(TINY_RUN | dict(workers=0)))
    finally:
        torch.set_num_threads(threads)
    lines = [l for l in capsys.readouterr().out.splitlines() if "resources per rank" in l]
    assert len(lines) == 1 and "(8 on this node): 8 core(s), 8 loader workers" in lines[0]
    assert "8 torch threads" in lines[0]


@pytest.mark.parametrize("deterministic,tf32", [(False, True), (True, False)])
def test_math_settings(tiny_raw, tmp_path, deterministic, tf32):
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled())
    try:
        Engine(Config(data=str(tiny_raw), out=str(tmp_path)).update(
            TINY_RUN | dict(deterministic=deterministic, tf32=tf32)))
        assert torch.backends.cudnn.benchmark is (not deterministic)
        assert torch.backends.cudnn.deterministic is deterministic
        assert torch.are_deterministic_algorithms_enabled() is deterministic
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32, det) = saved
        torch.use_deterministic_algorithms(det)


def test_sync_bn():
    model = build_model("resnet20", 4, width=0.25)
    converted = runtime.sync_batchnorm(model, "supervised", 8, torch.device("cuda", 0))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in converted.modules())
    assert runtime.sync_batchnorm(model, "supervised", 1, torch.device("cpu")) is model
    with pytest.raises(ValueError, match="shuffling BN"):
        runtime.sync_batchnorm(model, "moco", 8, torch.device("cuda", 0))
    with pytest.raises(ValueError, match="needs GPUs"):
        runtime.sync_batchnorm(model, "supervised", 2, torch.device("cpu"))


def test_device_loader_refuses_a_split_that_does_not_fit(tiny_raw, monkeypatch):
    ds = DatasetDir(tiny_raw)
    need = ds.split("train").num_samples * 16 * 16 * 3
    monkeypatch.setattr(device_loader, "free_memory", lambda device: int(need / device_loader.MAX_SHARE) - 1)
    with pytest.raises(DatasetError) as error:
        build_loader(ds, "train", kind="device", batch_size=8, views=[A.small_train()], train=True)
    message = str(error.value)
    assert "\n" not in message and "--loader ffcv" in message and "--loader dali" in message
    assert f"{need / 2**30:.2f} GiB" in message
    monkeypatch.setattr(device_loader, "free_memory", lambda device: int(need / device_loader.MAX_SHARE) + 1)
    assert build_loader(ds, "train", kind="device", batch_size=8, views=[A.small_train()], train=True).images.numel() == need
