"""Faults during training: a kill at every point of a checkpoint save (directory states, an interrupted
rename, a real `kill -9`), a full disk (injected and a tiny tmpfs), a read-only run directory, rejected
launches that must not touch an existing run, and user errors that must end in one line (exit code 2)."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fasttrain.config import Config, ConfigError
from fasttrain.checkpoints import CheckpointError, RunDirError, find_checkpoint

from conftest import REPO, fit, mark_metrics, resumed_at

RUN = dict(width=0.25, epochs=3, schedule="step", warmup_epochs=1, milestone_epochs=[2], milestone_factors=[0.1])


def run(data, out, **overrides):
    return fit(data, out, **(RUN | overrides))


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [r["loss"] for r in records(run_dir)]


def epochs(run_dir):
    return [r["epoch"] for r in records(run_dir)]


def weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]


def assert_kept(run_dir, before, epochs_kept):
    """The metrics lines of the epochs the resumed checkpoint holds are the ones written before the kill."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert lines[:epochs_kept] == before[:epochs_kept]
    assert not any('"kept"' in line for line in lines[epochs_kept:])   # later epochs were trained again


def assert_same_as(run_dir, full):
    assert epochs(run_dir) == [0, 1, 2]  # every epoch exactly once
    assert losses(run_dir) == losses(full)
    for k, v in weights(full).items():
        assert torch.equal(v, weights(run_dir)[k]), k
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best", "last"]  # no leftovers


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_raw):
    """An uninterrupted run, and the same run stopped after epoch 1 (P1) and after epoch 2 (P2)."""
    root = tmp_path_factory.mktemp("faults")
    run(tiny_raw, root / "full")
    run(tiny_raw, root / "p1", stop_after_epochs=1)
    shutil.copytree(root / "p1", root / "p2")
    run(tiny_raw, root / "p2", resume=str(root / "p2"), stop_after_epochs=1)
    return root


def _partial(ckpt):  # a save_state cut short: some files, no trainer_state.json
    (ckpt / "trainer_state.json").unlink()
    (ckpt / "optimizer.bin").write_bytes((ckpt / "optimizer.bin").read_bytes()[:100])


def _removing(ckpt):  # remove_checkpoint cut short: trainer_state.json went first, then some files
    (ckpt / "trainer_state.json").unlink()
    (ckpt / "model.safetensors").unlink()


# Each kill point of save_checkpoint("last") after epoch 1 (C1 = after epoch 0, C2 = after epoch 1), with the
# epoch-1 line of metrics.jsonl already written (it is appended before the checkpoint is saved), and where the
# resume must continue: (epoch, step, batch, checkpoint directory taken); 5 steps per epoch.
KILL_POINTS = {
    "while saving to .last.tmp": (dict(last="C1", tmp="C2", tmp_fix=_partial), (1, 5, 0, "last")),
    "after trainer_state.json, before the renames": (dict(last="C1", tmp="C2"), (2, 10, 0, ".last.tmp")),
    "between the two renames": (dict(old="C1", tmp="C2"), (2, 10, 0, ".last.tmp")),
    "before removing .last.old": (dict(last="C2", old="C1"), (2, 10, 0, "last")),
    "while removing .last.old": (dict(last="C2", old="C1", old_fix=_removing), (2, 10, 0, "last")),
    "while removing a stale .last.tmp": (dict(last="C1", tmp="C1", tmp_fix=_removing), (1, 5, 0, "last")),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_at_every_point_of_a_checkpoint_save(tiny_raw, runs, tmp_path, capsys, point):
    spec, resumed = KILL_POINTS[point]
    out = tmp_path / "run"
    shutil.copytree(runs / "p1", out)
    ck = out / "checkpoints"
    shutil.rmtree(ck / "last")
    source = {"C1": runs / "p1" / "checkpoints" / "last", "C2": runs / "p2" / "checkpoints" / "last"}
    for key, name in (("last", "last"), ("tmp", ".last.tmp"), ("old", ".last.old")):
        if key in spec:
            shutil.copytree(source[spec[key]], ck / name)
            if f"{key}_fix" in spec:
                spec[f"{key}_fix"](ck / name)
    with open(out / "metrics.jsonl", "a") as f:  # epoch 1's line, as written just before the save
        f.write(json.dumps(records(runs / "p2")[1]) + "\n")
    before = mark_metrics(out)
    capsys.readouterr()
    assert run(tiny_raw, out, resume=str(out)) == "done"
    assert resumed_at(capsys.readouterr().out, out) == resumed
    assert_kept(out, before, resumed[0])
    assert_same_as(out, runs / "full")


def test_kill_inside_the_real_rename_sequence(tiny_raw, runs, tmp_path, monkeypatch, capsys):
    """The code's own kill point between `last -> .last.old` and `.last.tmp -> last` (today's worst case)."""
    out = tmp_path / "run"
    real_rename, seen = Path.rename, []

    def rename(self, target):
        if self.name == ".last.tmp" and Path(target).name == "last":
            seen.append(1)
            if len(seen) == 2:  # the save after epoch 1
                raise KeyboardInterrupt("killed between the two renames")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_raw, out)
    monkeypatch.setattr(Path, "rename", real_rename)
    ck = out / "checkpoints"
    assert not (ck / "last").exists() and (ck / ".last.old").exists() and (ck / ".last.tmp").exists()
    assert epochs(out) == [0, 1]
    before = mark_metrics(out)
    capsys.readouterr()
    assert run(tiny_raw, out, resume=str(out)) == "done"
    assert resumed_at(capsys.readouterr().out, out) == (2, 10, 0, ".last.tmp")
    assert_kept(out, before, 2)
    assert_same_as(out, runs / "full")


def test_metrics_line_cut_short_by_a_kill_is_dropped(tiny_raw, runs, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(runs / "p1", out)
    before = mark_metrics(out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"loss": 1.23, "ep')
    capsys.readouterr()
    assert run(tiny_raw, out, resume=str(out)) == "done"
    assert resumed_at(capsys.readouterr().out, out) == (1, 5, 0, "last")
    assert_kept(out, before, 1)
    assert_same_as(out, runs / "full")


def test_killed_before_the_first_checkpoint_then_started_again(tiny_raw, runs, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps(records(runs / "p1")[0]) + "\n")  # epoch 0 logged, no checkpoint
    mark_metrics(out)
    assert run(tiny_raw, out) == "done"
    assert_kept(out, [], 0)                                 # the line of the lost epoch 0 was dropped
    assert_same_as(out, runs / "full")


# --- full disk, read-only run directory -----------------------------------------------------------------
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_raw, runs, tmp_path, monkeypatch, capsys):
    from accelerate import Accelerator
    real_save, saves = Accelerator.save_state, []

    def full_disk(self, output_dir, **kwargs):
        real_save(self, output_dir, **kwargs)
        saves.append(output_dir)
        if output_dir.endswith(".last.tmp") and sum(s.endswith(".last.tmp") for s in saves) == 2:  # after epoch 1
            (Path(output_dir) / "optimizer.bin").write_bytes(b"\0" * 10)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    out = tmp_path / "run"
    with pytest.raises(RunDirError, match=r"could not write checkpoint .*\.last\.tmp after epoch 2: RuntimeError.*"
                                          r"MiB free.*previous complete checkpoint.*--resume"):
        run(tiny_raw, out)
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    ck = out / "checkpoints"
    assert json.loads((ck / "last" / "trainer_state.json").read_text())["epoch"] == 1
    assert not (ck / ".last.tmp").exists()
    before = mark_metrics(out)
    capsys.readouterr()
    assert run(tiny_raw, out, resume=str(out)) == "done"
    assert resumed_at(capsys.readouterr().out, out) == (1, 5, 0, "last")
    assert_kept(out, before, 1)
    assert_same_as(out, runs / "full")


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_real_full_disk_on_a_tiny_tmpfs(tiny_raw, runs, tmp_path, capsys):
    mnt = tmp_path / "small"
    ckpt_kib = sum(p.stat().st_size for p in (runs / "p1" / "checkpoints" / "last").iterdir()) // 1024
    if not _mount_tmpfs(mnt, f"{int(ckpt_kib * 2.5)}k"):  # room for last + best, not for a third copy
        pytest.skip("needs root to mount a tmpfs")
    try:
        out = mnt / "run"
        with pytest.raises(RunDirError, match=r"could not write checkpoint|cannot write") as e:
            run(tiny_raw, out)
        assert "--resume" in str(e.value) and "\n" not in str(e.value)
        shutil.copytree(out, tmp_path / "moved")  # the user frees space: here, moves the run
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    moved = tmp_path / "moved"
    assert not list((moved / "checkpoints").glob(".*"))  # the half-written checkpoint was removed
    saved = json.loads((moved / "checkpoints" / "last" / "trainer_state.json").read_text())
    before = mark_metrics(moved)
    capsys.readouterr()
    assert run(tiny_raw, moved, resume=str(moved)) == "done"
    assert resumed_at(capsys.readouterr().out, moved) == (saved["epoch"], saved["step"], 0, "last")
    assert_kept(moved, before, saved["epoch"])
    assert_same_as(moved, runs / "full")


def test_read_only_run_directory(tiny_raw, runs, tmp_path):
    mnt = tmp_path / "ro"
    if not _mount_tmpfs(mnt, "8m"):
        pytest.skip("needs root to mount a tmpfs")
    try:
        shutil.copytree(runs / "p1", mnt / "p1")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(RunDirError, match=r"cannot write .*: Read-only file system; .*choose another --out"):
            run(tiny_raw, mnt / "new")
        with pytest.raises(RunDirError, match=r"Read-only file system; .*keeps its last complete checkpoint "
                                              r"\(after 1 epoch"):
            run(tiny_raw, mnt / "p1", resume=str(mnt / "p1"))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# --- rejected launches never touch an existing run ------------------------------------------------------
def test_rejected_launch_leaves_the_run_untouched(tiny_raw, runs, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(runs / "p1", out)
    lines = mark_metrics(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="--resume"):
        run(tiny_raw, out, lr=0.5)
    with pytest.raises(ConfigError, match=r"cannot change \['lr'\]"):
        run(tiny_raw, out, lr=0.5, resume=str(out))
    with pytest.raises(ConfigError, match="--epochs 0"):
        run(tiny_raw, out, epochs=0, resume=str(out))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    capsys.readouterr()
    assert run(tiny_raw, out, resume=str(out)) == "done"
    assert resumed_at(capsys.readouterr().out, out) == (1, 5, 0, "last")
    assert_kept(out, lines, 1)
    assert Config.load(out / "config.yaml").lr == 0.05
    assert_same_as(out, runs / "full")


# --- corrupt checkpoints: name the file, offer the others ----------------------------------------------
@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "optimizer.bin").write_bytes((c / "optimizer.bin").read_bytes()[:200]),
     r"last/optimizer\.bin is truncated or corrupt"),
    (lambda c: (c / "model.safetensors").write_bytes(b""), r"last/model\.safetensors is empty"),
    (lambda c: (c / "trainer_state.json").write_text('{"epoch": 1, "st'),
     r"last/trainer_state\.json is truncated or corrupt"),
])
def test_corrupt_checkpoint_names_the_file_and_the_alternatives(tiny_raw, runs, tmp_path, damage, message):
    out = tmp_path / "run"
    shutil.copytree(runs / "p2", out)
    damage(out / "checkpoints" / "last")
    with pytest.raises(CheckpointError, match=message) as e:
        run(tiny_raw, out, resume=str(out))
    text = str(e.value)
    assert "checkpoints/best (after" in text and "cp -r" in text and "new --out" in text and "\n" not in text


# --- user errors through the recipe CLI: exit code 2, one line, no traceback ----------------------------
def cli(argv, capsys):
    sys.path.insert(0, str(REPO / "recipes"))
    from presets import CIFAR

    from fasttrain.chain import run_single
    with pytest.raises(SystemExit) as e:
        run_single(CIFAR, "test", argv=[str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2, err
    assert "Traceback" not in err and lines and lines[-1].startswith(("error:", "test: error:")), err
    return lines[-1]


TINY = ["--arch", "resnet20", "--width", "0.25", "--batch-size", "16", "--warmup-epochs", "0", "--milestones", "",
        "--workers", "1", "--epochs", "1"]


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs 0: must be >= 1"), (["--epochs", "-3"], "--epochs -3: must be >= 1"),
    (["--eval-every", "0"], "--eval-every 0"), (["--grad-accum", "0"], "--grad-accum 0"),
    (["--batch-size", "0"], "--batch-size 0"), (["--workers", "-1"], "--workers -1"),
    (["--log-every", "0"], "--log-every 0"), (["--method", "nope"], "valid methods"),
    (["--loader", "nope"], "valid: ffcv, dali, torch, device"), (["--loss", "nope"], "valid: ce, focal"),
    (["--sampler", "nope"], "valid: uniform, resample, balanced, sqrt"), (["--schedule", "nope"], "valid: step, cosine"),
    (["--precision", "fp8"], "valid: no, bf16, fp16"), (["--reweight", "nope"], "valid: none, cb, drw"),
    (["--head", "nope"], "valid: auto, linear, cosine"), (["--optimizer", "adam"], "valid: sgd, apex_lamb"),
])
def test_bad_flags_are_one_line(tiny_raw, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    line = cli(["--data", tiny_raw, "--out", out, *TINY, *flags], capsys)
    assert message in line
    assert not out.exists()  # validated before anything is written


def test_config_file_errors_are_one_line(tiny_raw, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nlr: [0.1, 0.2\nseed: 1\n")
    line = cli(["--data", tiny_raw, "--out", tmp_path / "run", "--config", bad], capsys)
    assert f"{bad}:3:" in line and "invalid YAML" in line
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("epoch: 3\n")
    line = cli(["--data", tiny_raw, "--out", tmp_path / "run", "--config", unknown], capsys)
    assert str(unknown) in line and "'epoch' (did you mean 'epochs'?)" in line
    line = cli(["--data", tiny_raw, "--out", tmp_path / "run", "--config", tmp_path / "none.yaml"], capsys)
    assert "none.yaml: config file not found" in line


def test_data_errors_are_one_line(tiny_raw, tmp_path, capsys):
    line = cli(["--data", tmp_path / "nodata", "--out", tmp_path / "run", *TINY], capsys)
    assert "nodata does not exist" in line and "python -m data_prep.convert" in line
    half = tmp_path / "half"
    shutil.copytree(tiny_raw, half)
    (half / "manifest.json").unlink()
    line = cli(["--data", half, "--out", tmp_path / "run", *TINY], capsys)
    assert "manifest.json is missing" in line and "interrupted conversion" in line
    line = cli(["--out", tmp_path / "run", *TINY], capsys)
    assert "--data is required" in line
    assert not (tmp_path / "run").exists()


def test_truncated_checkpoint_through_the_cli(tiny_raw, runs, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(runs / "p2", out)
    opt = out / "checkpoints" / "last" / "optimizer.bin"
    opt.write_bytes(opt.read_bytes()[:300])
    line = cli(["--resume", out], capsys)
    assert str(opt) in line and "checkpoints/best" in line


def python_env():
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def test_bad_flag_in_a_real_process_exits_2_without_traceback(tiny_raw, tmp_path):
    r = subprocess.run([sys.executable, "recipes/supervised_cifar_lt.py", "--data", tiny_raw, "--out",
                        tmp_path / "run", "--epochs", "0"], capture_output=True, text=True, cwd=REPO,
                       env=python_env(), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: --epochs 0: must be >= 1"]


# --- a real kill -9 in the middle of a run --------------------------------------------------------------
KILL_SEED = 20  # the kill's delay after the first checkpoint: drawn, but the same in every run of the test


def test_kill_9_mid_run_then_resume_equals_uninterrupted(tiny_raw, tmp_path):
    args = [sys.executable, "recipes/supervised_cifar_lt.py", "--data", str(tiny_raw), *map(str, TINY[:-2]),
            "--epochs", "4", "--loader", "device", "--eval-every", "1"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    quiet = dict(cwd=REPO, env=python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uninterrupted = subprocess.Popen([*args, "--out", str(full)], **quiet)
    victim = subprocess.Popen([*args, "--out", str(killed)], **quiet)
    state = killed / "checkpoints" / "last" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        try:
            if json.loads(state.read_text())["epoch"] >= 1:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    time.sleep(random.Random(KILL_SEED).uniform(0, 0.5))  # anywhere in epoch 2, or inside its checkpoint save
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed / "DONE").exists(), "the run finished before it could be killed"
    assert uninterrupted.wait(timeout=600) == 0
    newest, saved = find_checkpoint(killed / "checkpoints", "last")      # what the kill left
    assert newest is not None and saved["epoch"] >= 1
    before = mark_metrics(killed)
    resumed = subprocess.run([*args[:2], "--resume", str(killed)], capture_output=True, text=True, cwd=REPO,
                             env=python_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_at(resumed.stdout, killed) == (saved["epoch"], saved["step"], 0, newest.name)
    assert_kept(killed, before, saved["epoch"])
    assert epochs(killed) == [0, 1, 2, 3]
    assert losses(killed) == losses(full)
    final = json.loads((killed / "metrics.json").read_text())
    assert final["top1"] == json.loads((full / "metrics.json").read_text())["top1"]
    assert final["per_class"] == json.loads((full / "metrics.json").read_text())["per_class"]


@pytest.mark.slow
def test_two_processes_resume_after_a_kill_between_the_renames(tiny_raw, tmp_path):
    """Two ranks (gloo): every rank picks the same checkpoint, only the main process renames and tidies."""
    from conftest import launch_two_processes
    out = tmp_path / "run"
    args = ["--data", tiny_raw, *TINY[:-2], "--epochs", "2", "--loader", "device"]
    recipe = REPO / "recipes" / "supervised_cifar_lt.py"
    launch_two_processes(recipe, *args, "--out", out, "--stop-after-epochs", "1")
    ck = out / "checkpoints"
    (ck / "last").rename(ck / ".last.old")                 # killed between the two renames ...
    shutil.copytree(ck / ".last.old", ck / ".last.tmp")    # ... of a save whose .last.tmp was not complete
    (ck / ".last.tmp" / "trainer_state.json").unlink()
    before = mark_metrics(out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"loss": 9.9, "epoch": 1}\n')            # and epoch 1's line already written
    result = launch_two_processes(recipe, "--resume", out)
    assert resumed_at(result.stdout + result.stderr, out) == (1, 5, 0, ".last.old") and (out / "DONE").exists()
    assert_kept(out, before, 1)
    assert epochs(out) == [0, 1] and 9.9 not in losses(out)
    assert sorted(p.name for p in ck.iterdir()) == ["best", "last"]


def test_chain_checks_every_stage_before_the_first_starts(tiny_raw, tmp_path, capsys):
    from fasttrain.chain import Stage, run_chain
    stages = [Stage("a", dict(epochs=1)), Stage("b", dict(epochs=1))]
    with pytest.raises(SystemExit) as e:
        run_chain(stages, "test", argv=["--data", str(tiny_raw), "--out", str(tmp_path / "chain"), *TINY,
                                        "--set", "b.grad_accum=0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == "error: --grad-accum 0: must be >= 1", err
    assert not (tmp_path / "chain").exists()  # stage a never started
