"""A diverging run (NaN / infinite loss) stops at the first log step that sees it, with one line naming the epoch,
step, lr and the last checkpoint, and exit code 3 from a recipe; `best` never points at a diverged epoch, also
with `--nonfinite-loss continue`, which trains on."""
from __future__ import annotations

import json
import math
import sys

import pytest

from fasttrain.stopping import Diverged

from conftest import REPO, fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")    # exact floats: the same thread count every time

# lr 1e-6 for epoch 0 (which ends below chance: top-1 21.9 < 25), 1e9 from epoch 1 on: the loss overflows to
# NaN at its 4th step (seed 2); log steps every 2 steps and at the end of each 5-step epoch
DIVERGING = dict(epochs=3, lr=1e-6, schedule="step", milestone_epochs=[1], milestone_factors=[1e15], log_every=2,
                 seed=2)


def record_losses(monkeypatch):
    """Whether each step's loss was finite, in order (the test reads them; the engine never does)."""
    from fasttrain.methods.supervised import Supervised
    real, finite = Supervised.loss, []

    def loss(self, model, batch, epoch):
        value, logs = real(self, model, batch, epoch)
        finite.append(math.isfinite(value.item()))
        return value, logs

    monkeypatch.setattr(Supervised, "loss", loss)
    return finite


def first_log_step_after(steps_finite: list[bool], per_epoch: int = 5, log_every: int = 2) -> int:
    first_bad = steps_finite.index(False)                     # 0-based step
    for step in range(first_bad, len(steps_finite) + per_epoch):
        i = step % per_epoch
        if (i + 1) % log_every == 0 or i + 1 == per_epoch:
            return step + 1                                   # steps done when that log step is read


def state(path):
    return json.loads((path / "trainer_state.json").read_text())


def test_a_nonfinite_loss_stops_at_the_first_log_step_that_sees_it(tiny_raw, tmp_path, monkeypatch):
    out = tmp_path / "run"
    finite = record_losses(monkeypatch)
    with pytest.raises(Diverged) as e:
        fit(tiny_raw, out, **DIVERGING)
    step = first_log_step_after(finite)
    assert len(finite) == step == 9 and finite.index(False) == 8          # NaN in step 9, read at its log step
    assert str(e.value) == (f"the training loss is not finite at epoch 1 (step 9, batch 4 of 5, lr 1e+09); stopped: "
                            f"the last checkpoint is {out}/checkpoints/last (epoch 1, step 5). Lower --lr (a new "
                            f"--out), or --nonfinite-loss continue to train on")
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0]
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["best", "last"] and not (out / "DONE").exists()
    assert (state(ck / "last")["epoch"], state(ck / "last")["step"], state(ck / "best")["best_epoch"]) == (1, 5, 0)


def test_continue_trains_on_but_never_selects_a_nonfinite_epoch(tiny_raw, tmp_path):
    out = tmp_path / "run"
    assert fit(tiny_raw, out, nonfinite_loss="continue", **DIVERGING) == "done"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [math.isfinite(r["loss"]) for r in lines] == [True, False, False]
    assert lines[0]["eval_top1"] < lines[1]["eval_top1"]          # a diverged epoch scores higher here ...
    assert json.loads((out / "DONE").read_text())["best_epoch"] == 0        # ... and is still not the best


def test_a_recipe_exits_3_with_one_line(tiny_raw, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "recipes"))
    from presets import CIFAR

    from fasttrain.chain import run_single
    flags = ["--data", tiny_raw, "--out", tmp_path / "run", "--arch", "resnet20", "--width", "0.5", "--batch-size",
             "16", "--workers", "1", "--loader", "device", "--warmup-epochs", "0", "--milestone-epochs", "1",
             "--milestone-factors", "1e15", "--epochs", "3", "--lr", "1e-6", "--log-every", "2", "--seed", "2"]
    with pytest.raises(SystemExit) as e:
        run_single(CIFAR, "test", argv=[str(f) for f in flags])
    err = capsys.readouterr().err                             # the progress bars, then one line
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert e.value.code == 3 and "Traceback" not in err and errors == [err.splitlines()[-1]]
    assert errors[0].startswith("error: the training loss is not finite at epoch 1 (step ")
    last = tmp_path / "run" / "checkpoints" / "last"
    assert f"lr 1e+09); stopped: the last checkpoint is {last} (epoch 1, step 5)" in errors[0]
