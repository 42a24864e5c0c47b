"""The engine: outputs, exact resume, stop-after-epochs, every loss / sampler, clear errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fasttrain.config import Config
from fasttrain.dataset import DatasetError

from conftest import TINY_RUN, fit, mark_metrics, resumed_at, write_tiny

# four epochs with warm-up and a step, so resuming has to get the schedule right
SCHEDULE = dict(epochs=4, warmup_epochs=1, schedule="step", milestone_epochs=[3], milestone_factors=[0.1])


def run(data, out, **overrides):
    return fit(data, out, **(SCHEDULE | overrides))


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]


def test_run_writes_everything(tiny_raw, tmp_path):
    out = tmp_path / "run"
    assert run(tiny_raw, out) == "done"
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "confusion.npz", "per_class.png", "model.pt",
                 "backbone.pt", "DONE", "checkpoints/last", "checkpoints/best"):
        assert (out / name).exists(), name
    m = json.loads((out / "metrics.json").read_text())
    assert {"top1", "top5", "many", "medium", "few", "per_class", "train_class_counts"} <= set(m)
    assert m["train_class_counts"] == [48, 24, 12, 6] and m["num_eval_images"] == 64
    assert m["many"] is None and m["medium"] is not None and m["few"] is not None  # counts 48/24 medium, 12/6 few
    assert np.load(out / "confusion.npz")["counts"].sum() == 64
    assert Config.load(out / "config.yaml").epochs == 4
    assert len(losses(out)) == 4 and all(np.isfinite(losses(out)))


def test_learns_the_tiny_task(tiny_raw, tmp_path):
    run(tiny_raw, tmp_path / "run", epochs=8, milestone_epochs=[6])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["top1"] > 40  # chance is 25


def test_stop_and_resume_equals_uninterrupted(tiny_raw, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    run(tiny_raw, full)
    assert run(tiny_raw, part, stop_after_epochs=2) == "stopped"
    assert not (part / "DONE").exists() and len(losses(part)) == 2
    before = mark_metrics(part)
    capsys.readouterr()
    assert run(tiny_raw, part, resume=str(part)) == "done"
    assert resumed_at(capsys.readouterr().out, part) == (2, 10, 0, "last")   # 2 epochs of 5 steps
    assert (part / "metrics.jsonl").read_text().splitlines()[:2] == before   # kept, not written again
    assert losses(part) == losses(full)
    for k, v in weights(full).items():
        assert torch.equal(v, weights(part)[k]), k


def test_killed_mid_epoch_resumes_from_last_checkpoint(tiny_raw, tmp_path, monkeypatch, capsys):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(tiny_raw, full)
    from fasttrain.methods.supervised import Supervised
    real_loss, calls = Supervised.loss, {"n": 0}

    def dying_loss(self, model, batch, epoch):
        if epoch == 2:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("simulated kill in the middle of epoch 3")
        return real_loss(self, model, batch, epoch)

    monkeypatch.setattr(Supervised, "loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_raw, killed)
    monkeypatch.setattr(Supervised, "loss", real_loss)
    (killed / "checkpoints" / ".last.tmp").mkdir()  # a half-written checkpoint must be ignored
    with pytest.raises(FileExistsError, match="--resume"):
        run(tiny_raw, killed)
    before = mark_metrics(killed)
    capsys.readouterr()
    assert run(tiny_raw, killed, resume=str(killed)) == "done"
    assert resumed_at(capsys.readouterr().out, killed) == (2, 10, 0, "last")  # epoch 2 lost, started again
    assert (killed / "metrics.jsonl").read_text().splitlines()[:2] == before
    assert losses(killed) == losses(full)


@pytest.mark.parametrize("overrides", [
    dict(loss="focal", focal_gamma=1.0), dict(loss="ldam", head="cosine", reweight="drw", drw_epoch=1),
    dict(loss="ce", reweight="cb"), dict(loss="balanced_softmax"), dict(loss="logit_adjust"),
    dict(sampler="balanced"), dict(sampler="sqrt"), dict(precision="bf16", channels_last=True),
    dict(grad_accum=2), dict(schedule="cosine"), dict(loader="torch"), dict(loader="ffcv"), dict(loader="dali"),
])
def test_losses_samplers_and_options_train(tiny_raw, tmp_path, overrides):
    assert run(tiny_raw, tmp_path / "run", epochs=2, **overrides) == "done"
    assert all(np.isfinite(losses(tmp_path / "run")))


def test_crt_freezes_backbone_and_needs_pretrained(tiny_raw, tmp_path):
    base = tmp_path / "base"
    run(tiny_raw, base, epochs=2)
    with pytest.raises(ValueError, match="--pretrained"):
        run(tiny_raw, tmp_path / "crt_bad", method="crt", epochs=1)
    run(tiny_raw, tmp_path / "crt", method="crt", epochs=2, sampler="balanced", crt_freeze_bn=True,
        pretrained=str(base / "backbone.pt"))
    before, after = weights(base), weights(tmp_path / "crt")
    for k, v in after.items():
        if not k.startswith("fc."):
            assert torch.equal(v, before[k]), f"{k} changed although the backbone is frozen"
    assert not torch.equal(after["fc.weight"], before["fc.weight"])


def test_clear_errors(tiny_raw, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        run(tiny_raw, tmp_path / "a", method="nope")
    with pytest.raises(DatasetError, match="does not exist"):
        run(tmp_path / "missing", tmp_path / "b")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_raw, broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="manifest.json"):
        run(broken, tmp_path / "c")
    (broken / "manifest.json").unlink()
    with pytest.raises(DatasetError, match="manifest.json is missing"):
        run(broken, tmp_path / "d")
    with pytest.raises(ValueError, match="unknown config key"):
        Config().update({"learning_rate": 1})


def test_checkpoint_with_other_class_count_is_a_clear_error(tmp_path):
    data = write_tiny(tmp_path / "data4")
    run(data, tmp_path / "run", stop_after_epochs=1)
    shutil.rmtree(data)
    write_tiny(data, num_classes=6)  # the dataset was re-converted with other classes
    with pytest.raises(ValueError, match="classifier has 4 classes but the data .* has 6"):
        run(data, tmp_path / "run", resume=str(tmp_path / "run"))


def test_apex_absent_is_a_clear_error(tiny_raw, tmp_path):
    pytest.importorskip("torch")
    try:
        import apex.optimizers  # noqa: F401
        pytest.skip("NVIDIA apex is installed here")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="NVIDIA apex"):
        run(tiny_raw, tmp_path / "run", optimizer="apex_lamb")


def test_gradient_accumulation_steps_at_the_end_of_every_epoch(tiny_raw, tmp_path):
    """90 train images at batch 16 are 5 micro-batches an epoch; with --grad-accum 2 the optimiser steps after
    micro-batches 2, 4 and 5 (that last step averages its one micro-batch), so no gradient is carried into
    the next epoch and an epoch is steps_per_epoch steps."""
    from fasttrain.engine import Engine, accumulation_group
    assert [accumulation_group(i, 5, 2) for i in range(5)] == [2, 2, 2, 2, 1]
    assert [accumulation_group(i, 6, 4) for i in range(6)] == [4, 4, 4, 4, 2, 2]
    engine = Engine(Config(data=str(tiny_raw), out=str(tmp_path / "run")).update(
        dict(TINY_RUN, epochs=2, grad_accum=2)))
    assert len(engine.train_loader) == 5 and engine.steps_per_epoch == 3
    engine.train_epoch(0)
    assert engine.state["step"] == 3
    assert all(p.grad is None for p in engine.model.parameters())     # nothing left over for epoch 2
    engine.train_epoch(1)
    assert engine.state["step"] == 6
    engine.close()
