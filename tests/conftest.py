"""Shared fixtures: tiny long-tailed datasets in the real on-disk format (written by data_prep)."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

TRAIN_COUNTS = [48, 24, 12, 6]   # a 4-class long tail
UNLABELED_COUNTS = [40, 40, 40, 40]
TEST_PER_CLASS = 16
SIZE = 16


def make_images(labels: np.ndarray, rng: np.random.Generator, size: int = SIZE, channels: int = 3) -> np.ndarray:
    """Learnable synthetic images: each class a different colour gradient direction, plus noise."""
    n = len(labels)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    patterns = np.stack([xx, yy, 1 - xx, 1 - yy, (xx + yy) / 2, np.abs(xx - yy)])
    base = patterns[labels % len(patterns)] * 200                       # N x H x W
    img = base[..., None] * np.ones(channels) + rng.normal(0, 25, (n, size, size, channels))
    img[..., 0] += (labels[:, None, None] * 13) % 50
    return np.clip(img, 0, 255).astype(np.uint8)


def _split(counts, rng, offset):
    labels = np.repeat(np.arange(len(counts)), counts)
    return {"images": make_images(labels, rng), "labels": labels,
            "source_index": offset + np.arange(len(labels))}


def write_tiny(out, *, seed: int = 0, num_classes: int = 4, formats=("ffcv", "dali"), val_per_class: int = 0):
    from data_prep.convert import write_dataset
    rng = np.random.default_rng(seed)
    counts = TRAIN_COUNTS[:num_classes] if num_classes <= 4 else TRAIN_COUNTS + [6] * (num_classes - 4)
    splits = {"train": _split(counts, rng, 0),
              "unlabeled": _split(UNLABELED_COUNTS[:1] * num_classes, rng, 10_000),
              "test": _split([TEST_PER_CLASS] * num_classes, rng, 20_000)}
    if val_per_class:
        splits["val"] = _split([val_per_class] * num_classes, rng, 30_000)
    return write_dataset(out, splits, num_classes=num_classes, encoding="raw", formats=formats, shard_size=64,
                         workers=1)


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory):
    """4 classes, 16x16x3 raw pixels: train 48/24/12/6, unlabeled pool 160, balanced test 64."""
    return write_tiny(tmp_path_factory.mktemp("data") / "tiny_raw")


@pytest.fixture(scope="session")
def tiny_raw_val(tmp_path_factory):
    """tiny_raw with a val split too (8 images per class), like ImageNet-LT: select on val, report test."""
    return write_tiny(tmp_path_factory.mktemp("data") / "tiny_raw_val", formats=("dali",), val_per_class=8)


# A small, fast training run: the defaults of every in-process engine run in the tests.
TINY_RUN = dict(arch="resnet20", width=0.5, epochs=1, batch_size=16, lr=0.05, schedule="constant", loader="device",
                workers=1, log_every=1000)


def reset_accelerate() -> None:
    """Accelerate's state is a process-wide singleton: each in-process run starts from a fresh one."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def fit(data, out, **overrides) -> str:
    """Train in this process with TINY_RUN < overrides; returns "done" or "stopped"."""
    from fasttrain.config import Config
    from fasttrain.engine import Engine
    try:
        return Engine(Config(data=str(data), out=str(out)).update(TINY_RUN | overrides)).fit()
    finally:
        reset_accelerate()


def resumed_at(log: str, run_dir) -> tuple[int, int, int, str]:
    """Where the engine's log says the run resumed: (epoch, step, batch inside the epoch or 0, the checkpoint
    directory it was taken from). Exactly one such line."""
    found = re.findall(rf"resumed {re.escape(str(run_dir))} at epoch (\d+) \(step (\d+)\)(?:, batch (\d+) of \d+)?"
                       rf"(?: from (\S+) \(a save was interrupted\))?\n", log)
    assert len(found) == 1, f"expected one resume line for {run_dir}: {found}"
    epoch, step, batch, source = found[0]
    return int(epoch), int(step), int(batch or 0), source or "last"


def mark_metrics(run_dir) -> list[str]:
    """Tag every line of RUN/metrics.jsonl ("kept": true) and return the tagged lines: a resumed run must keep
    the lines of the epochs it does not redo byte for byte (an epoch trained again would log an untagged line)."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.dumps(json.loads(line) | {"kept": True}))
        except ValueError:              # a line cut short by a kill stays as it is (a resume drops it)
            lines.append(line)
    path.write_text("".join(f"{line}\n" for line in lines))
    return [line for line in lines if line.endswith('"kept": true}')]


@pytest.fixture
def one_torch_thread():
    """Runs compared bit for bit need the same number of torch threads: with OMP_NUM_THREADS set, the engine
    keeps the process's count, which an earlier test may have changed."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    reset_accelerate()


def launch_two_processes(script, *args, timeout=600, check=True) -> subprocess.CompletedProcess:
    """`accelerate launch` with two CPU processes (gloo), the way the multi-GPU path is tested here:
    ACCELERATE_USE_CPU=true + --multi_gpu (plain --cpu --num_processes 2 silently runs one process).
    check: the launch must exit 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), str(script), *map(str, args)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0 or not check, result.stdout[-3000:] + result.stderr[-5000:]
    return result


# ---------------------------------------------------------------- no silent skips in CI
# With FASTTRAIN_NO_SKIPS=1 (set by .ci/run) a skipped test fails the run unless its reason starts with one of
# these: tests that need hardware CI does not have.
ALLOWED_SKIPS = ("needs a CUDA device", "needs a GPU")
_skips: list[tuple[str, str]] = []


def _record_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append((report.nodeid, reason.removeprefix("Skipped: ")))


def pytest_runtest_logreport(report):
    _record_skip(report)


def pytest_collectreport(report):
    _record_skip(report)


def _forbidden_skips() -> list[tuple[str, str]]:
    if os.environ.get("FASTTRAIN_NO_SKIPS") != "1":
        return []
    return [(node, reason) for node, reason in _skips if not reason.startswith(ALLOWED_SKIPS)]


def pytest_sessionfinish(session, exitstatus):
    if _forbidden_skips() and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    forbidden = _forbidden_skips()
    if forbidden:
        terminalreporter.section(f"{len(forbidden)} skipped test(s) not allowed in CI (tests/conftest.py, "
                                 f"ALLOWED_SKIPS): the run fails", red=True)
        for node, reason in forbidden:
            terminalreporter.write_line(f"{node}: {reason}")
