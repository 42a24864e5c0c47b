"""Runs that survive preemption: every loader starts an epoch at batch k with the batches a whole pass gives
from k; SIGTERM / SIGUSR1 end the run after the current step with a checkpoint at that step, and resuming it
gives exactly the uninterrupted run (one process, and two under `accelerate launch`); a second signal during
the save leaves a complete checkpoint."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from fasttrain.data import augment as A

from conftest import REPO, fit, reset_accelerate, resumed_at
from test_loaders import assert_same_batches, jpeg, loader, raw  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


# ---------------------------------------------------------------- loaders: an epoch from batch k


@pytest.mark.parametrize("kind", ["ffcv", "dali", "torch", "device"])
def test_raw_set_epoch_from_batch_k_equals_the_whole_pass_from_k(raw, kind):  # noqa: F811
    ds, _ = raw
    ld = loader(ds, kind, train=True, sampler="balanced", views=[A.small_train(), A.moco_v2(16)], seed=5,
                rank=1, world_size=2, batch_size=8)
    ld.set_epoch(3)
    whole = list(ld)
    assert len(whole) == len(ld) == 8
    for k in (1, 5, 8):
        ld.set_epoch(3, first_batch=k)
        assert_same_batches(list(ld), whole[k:])
    ld.set_epoch(3)
    assert_same_batches(list(ld), whole)           # a later whole pass starts at batch 0 again


@pytest.mark.parametrize("kind", ["dali", "torch", "device"])
def test_jpeg_set_epoch_from_batch_k_equals_the_whole_pass_from_k(jpeg, kind):  # noqa: F811
    """Random crops and flips of stage 1 (torch, DALI) and stage 2 are functions of the batch number."""
    ld = loader(jpeg, kind, train=True, views=[A.large_train(24), A.moco_v2(16)], seed=2, batch_size=8)
    ld.set_epoch(1)
    whole = list(ld)
    ld.set_epoch(1, first_batch=2)
    assert_same_batches(list(ld), whole[2:])


def test_ffcv_jpeg_epoch_from_batch_k_keeps_the_order(jpeg):  # noqa: F811
    """FFCV's jpeg crops come from numba's generators (not reproducible); its order still starts at k."""
    ld = loader(jpeg, "ffcv", train=True, views=[A.large_train(24)], seed=2, batch_size=8)
    ld.set_epoch(1)
    whole = torch.cat([b.indices for b in ld])
    ld.set_epoch(1, first_batch=3)
    assert torch.equal(torch.cat([b.indices for b in ld]), whole[3 * 8:])


def test_first_batch_out_of_range_is_an_error(raw):  # noqa: F811
    ds, _ = raw
    ld = loader(ds, "device", train=True, views=[A.small_train()], batch_size=16)
    with pytest.raises(ValueError, match="first_batch 9 is not in 0..8"):
        ld.set_epoch(0, first_batch=9)


# ---------------------------------------------------------------- a signal, then the same command again

# 3 epochs of 5 steps (90 images, batch 16), a warm-up and an lr step, so the resumed schedule must be right
RUN = dict(epochs=3, warmup_epochs=1, schedule="step", milestone_epochs=[2], milestone_factors=[0.1])
TIMING = ("seconds", "train_images_per_s")
STOP = re.compile(r"(SIG\w+|a signal to another rank): stopped at epoch (\d+) \(step (\d+)\)(?:, batch (\d+) of 5)?;")


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records(run_dir)]


def weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]


def assert_same_run(run_dir, straight):
    assert without_timing(run_dir) == without_timing(straight)     # every epoch once, the same values
    for k, v in weights(straight).items():
        assert torch.equal(v, weights(run_dir)[k]), k
    names = [sorted(p.name for p in (r / "checkpoints").iterdir()) for r in (run_dir, straight)]
    assert names[0] == names[1] and names[0] in (["best", "last"], ["last"])     # no leftovers


def trainer_state(run_dir):
    return json.loads((run_dir / "checkpoints" / "last" / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def straight(tiny_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("signals") / "straight"
    torch.set_num_threads(1)                       # made before one_torch_thread (conftest) runs
    assert fit(tiny_raw, out, **RUN) == "done"
    return out


def signal_at(monkeypatch, sig, epoch, batch=None, method=None):
    """Send `sig` to this process while batch `batch` of `epoch` computes its loss (None: while `epoch` is
    evaluated, i.e. after its last step)."""
    from fasttrain.engine import Engine
    from fasttrain.methods.supervised import Supervised
    method = method or Supervised
    real_loss, real_evaluate, calls = method.loss, Engine.evaluate, {}

    def loss(self, model, batch_, epoch_):
        calls[epoch_] = calls.get(epoch_, 0) + 1
        if batch is not None and (epoch_, calls[epoch_] - 1) == (epoch, batch):
            os.kill(os.getpid(), sig)
        return real_loss(self, model, batch_, epoch_)

    def evaluate(self, epoch_, split=None):
        if batch is None and epoch_ == epoch and split is None:
            os.kill(os.getpid(), sig)
        return real_evaluate(self, epoch_, split)

    monkeypatch.setattr(method, "loss", loss)
    monkeypatch.setattr(Engine, "evaluate", evaluate)
    return lambda: (monkeypatch.setattr(method, "loss", real_loss),
                    monkeypatch.setattr(Engine, "evaluate", real_evaluate))


# (signal, epoch, batch whose step is running; loader) -> where the run stops: (epoch, step, batch)
POINTS = {
    "SIGTERM inside epoch 1": (signal.SIGTERM, 1, 2, "device", (1, 8, 3)),
    "SIGUSR1 at the first step": (signal.SIGUSR1, 0, 0, "ffcv", (0, 1, 1)),
    "SIGTERM at an epoch's last step": (signal.SIGTERM, 1, 4, "dali", (1, 10, 5)),
    "SIGTERM during an evaluation": (signal.SIGTERM, 1, None, "device", (2, 10, None)),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_signal_then_resume_equals_the_straight_run(tiny_raw, straight, tmp_path, monkeypatch, capsys, point):
    sig, epoch, batch, kind, (stop_epoch, stop_step, stop_batch) = POINTS[point]
    out = tmp_path / "run"
    restore = signal_at(monkeypatch, sig, epoch, batch)
    assert fit(tiny_raw, out, loader=kind, **RUN) == "interrupted"
    restore()
    stopped = STOP.findall(capsys.readouterr().out)
    assert stopped == [(sig.name, str(stop_epoch), str(stop_step), str(stop_batch or ""))]
    state = trainer_state(out)
    assert (state["epoch"], state["step"], state.get("batch")) == (stop_epoch, stop_step, stop_batch)
    before = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    assert [json.loads(line)["epoch"] for line in before] == list(range(stop_epoch))

    assert fit(tiny_raw, out, loader=kind, resume=str(out), **RUN) == "done"
    inside = f", batch {stop_batch} of 5" if stop_batch else ""
    assert f"resumed {out} at epoch {stop_epoch} (step {stop_step}){inside}\n" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text().splitlines()[:stop_epoch] == before   # kept, not rewritten
    assert_same_run(out, straight)


def test_moco_signalled_inside_an_epoch_resumes_like_a_straight_run(tiny_raw, tmp_path, monkeypatch, capsys):
    """The queue, its pointer, the key encoder and the shuffling-BN randomness continue as if never stopped."""
    from fasttrain.methods.moco import MoCo
    moco = dict(method="moco", moco_dim=8, moco_queue=64, moco_shuffle_groups=2, epochs=2)
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert fit(tiny_raw, straight, **moco) == "done"
    restore = signal_at(monkeypatch, signal.SIGTERM, 1, 1, method=MoCo)
    assert fit(tiny_raw, out, **moco) == "interrupted"
    restore()
    capsys.readouterr()
    assert fit(tiny_raw, out, resume=str(out), **moco) == "done"
    assert resumed_at(capsys.readouterr().out, out) == (1, 7, 2, "last")
    assert_same_run(out, straight)


# ---------------------------------------------------------------- real processes: exit status, launcher

SCRIPT = REPO / "tests" / "scripts" / "signalled_recipe.py"
RECIPE = REPO / "recipes" / "supervised_cifar_lt.py"
TINY = ["--arch", "resnet20", "--width", "0.25", "--batch-size", "16", "--warmup-epochs", "0", "--milestones", "",
        "--workers", "1", "--loader", "device", "--epochs", "2"]


def python(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)


def test_a_second_signal_during_the_save_leaves_a_complete_checkpoint(tiny_raw, tmp_path):
    out = tmp_path / "run"
    r = python(SCRIPT, 1, 2, -1, "TERM", 1, "--", "--data", tiny_raw, "--out", out, *TINY)
    assert r.returncode == 75, r.stdout[-2000:] + r.stderr[-3000:]        # stopped by a signal, resumable
    assert STOP.findall(r.stdout) == [("SIGTERM", "1", "8", "3")]
    state = trainer_state(out)
    assert (state["epoch"], state["step"], state["batch"]) == (1, 8, 3)
    assert sorted(p.name for p in (out / "checkpoints" / "last").iterdir()) == [
        "model.safetensors", "optimizer.bin", "progress_rank0.pt", "random_states_0.pkl", "trainer_state.json"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "last"]   # no half-written one
    r = python(RECIPE, "--resume", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed {out} at epoch 1 (step 8), batch 3 of 5\n" in r.stdout
    assert [rec["epoch"] for rec in records(out)] == [0, 1] and (out / "DONE").exists()


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_and_resume_like_a_straight_run(tiny_raw, tmp_path):
    """Rank 1 alone gets SIGTERM: both ranks agree to stop one step later (fasttrain/stopping.py) and save that
    step. Once inside epoch 0 (batch 3 of 5), once after the last step of epoch 1 (batch 5 of 5: the resumed
    epoch ends with each rank's own BatchNorm statistics and loss sums); the run then ends exactly as an
    uninterrupted one."""
    from conftest import launch_two_processes
    straight, out = tmp_path / "straight", tmp_path / "run"
    launch_two_processes(RECIPE, "--data", tiny_raw, "--out", straight, *TINY)
    launches = [(("--data", tiny_raw, "--out", out, *TINY), (0, 1), (0, 3, 3)),   # signal in batch 1 of epoch 0
                (("--resume", out), (1, 3), (1, 10, 5))]                           # signal in batch 3 of epoch 1
    for n, (args, (epoch, batch), stop) in enumerate(launches):
        r = launch_two_processes(SCRIPT, epoch, batch, 1, "TERM", 0, "--", *args, check=False)
        log = r.stdout + r.stderr
        assert r.returncode != 0 and "exitcode  : 75" in log, log[-5000:]           # both workers exit 75
        assert STOP.findall(log) == [("a signal to another rank", *map(str, stop))]  # logged by rank 0
        state = trainer_state(out)
        assert (state["epoch"], state["step"], state["batch"], state["processes"]) == (*stop, 2)
        assert {p.name for p in (out / "checkpoints" / "last").glob("progress_rank*.pt")} == {
            "progress_rank0.pt", "progress_rank1.pt"}
        if n:
            assert f"resumed {out} at epoch 0 (step 3), batch 3 of 5\n" in log
    r = launch_two_processes(RECIPE, "--resume", out)
    assert f"resumed {out} at epoch 1 (step 10), batch 5 of 5\n" in r.stdout + r.stderr
    assert_same_run(out, straight)


def test_a_checkpoint_inside_an_epoch_resumes_only_with_as_many_processes(tiny_raw, tmp_path, monkeypatch):
    from fasttrain.checkpoints import CheckpointError
    out = tmp_path / "run"
    restore = signal_at(monkeypatch, signal.SIGTERM, 1, 2)
    assert fit(tiny_raw, out, **RUN) == "interrupted"
    restore()
    path = out / "checkpoints" / "last" / "trainer_state.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"processes": 2}))    # as if 2 processes wrote it
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"last was written inside epoch 1 \(after batch 3\) by 2 process\(es\); "
                                              r".*resume with 2 \(this launch has 1\)"):
        fit(tiny_raw, out, resume=str(out), **RUN)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before      # nothing written


def test_a_signalled_chain_continues_at_that_step_with_the_same_command(tiny_raw, tmp_path, monkeypatch, capsys):
    from fasttrain.chain import Stage, run_chain
    stages = [Stage("a", dict(epochs=2)), Stage("b", dict(epochs=1))]
    chain = tmp_path / "chain"
    argv = [str(a) for a in ("--data", tiny_raw, "--out", chain, *TINY[:-4])]   # the stages set the epochs
    restore = signal_at(monkeypatch, signal.SIGUSR1, 1, 2)
    with pytest.raises(SystemExit) as e:
        run_chain(stages, "test", argv=argv)
    restore()
    assert e.value.code == 75 and "chain paused in stage a" in capsys.readouterr().out
    assert not (chain / "b").exists()
    reset_accelerate()
    assert run_chain(stages, "test", argv=argv) == "done"
    assert resumed_at(capsys.readouterr().out, chain / "a") == (1, 8, 3, "last")
    assert (chain / "a" / "DONE").exists() and (chain / "b" / "DONE").exists()
