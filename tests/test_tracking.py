"""Experiment tracking through Accelerate's trackers: the TensorBoard event files, read back with
TensorBoard's own reader, hold the values of metrics.jsonl on one global-step axis that a resumed run
continues; a missing tracker package is one clear error naming the pip command."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from conftest import fit
from fasttrain import tracking

pytest.importorskip("tensorboard")


def read_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_curves_match_metrics_jsonl_across_a_resume(tiny_raw, tmp_path):
    out = tmp_path / "run"
    run = dict(epochs=3, log_every=2, log_with="tensorboard", schedule="step", milestone_epochs=[2], milestone_factors=[0.1])
    assert fit(tiny_raw, out, stop_after_epochs=2, **run) == "stopped"
    # an attempt that died in epoch 3 after logging a step, before its checkpoint: resuming drops that point
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(out / "tracking" / "fasttrain")) as writer:
        writer.add_scalar("train/loss", 999.0, 11)
    assert fit(tiny_raw, out, resume=str(out), **run) == "done"

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    events = sorted((out / "tracking" / "fasttrain").glob("events.out.tfevents.*"))
    assert len(events) == 3                                   # one file per attempt, read as one run
    scalars = read_scalars(out / "tracking" / "fasttrain")

    epoch_steps = [s for s, _ in scalars["epoch"]]
    assert [v for _, v in scalars["epoch"]] == [1, 2, 3]
    steps_per_epoch = epoch_steps[0]
    assert epoch_steps == [steps_per_epoch, 2 * steps_per_epoch, 3 * steps_per_epoch]   # the step continues
    for record, step in zip(records, epoch_steps):
        for key, tag in (("loss", "epoch/loss"), ("lr", "epoch/lr"), ("train_images_per_s", "epoch/train_images_per_s"),
                         ("eval_top1", "eval/top1"), ("eval_top5", "eval/top5"), ("eval_many", "eval/many"),
                         ("eval_medium", "eval/medium"), ("eval_few", "eval/few")):
            if record[key] is None:                          # no many-shot class in the tiny set: not logged
                assert step not in dict(scalars.get(tag, [])), tag
                continue
            logged = dict(scalars[tag])[step]
            assert math.isclose(logged, record[key], rel_tol=1e-6), (tag, step, logged, record[key])
    # per-step curve: every log_every steps and at each epoch's end, strictly increasing, no repeated step
    loss_steps = [s for s, _ in scalars["train/loss"]]
    assert loss_steps == sorted(set(loss_steps)) and loss_steps[-1] == 3 * steps_per_epoch
    assert 999.0 not in [v for _, v in scalars["train/loss"]]
    assert {2, 4, steps_per_epoch, 2 * steps_per_epoch + 2} <= set(loss_steps)
    steps = dict(scalars["train/loss"])                      # at an epoch's end: the epoch mean (one process)
    assert all(math.isclose(steps[s], r["loss"], rel_tol=1e-6) for s, r in zip(epoch_steps, records))
    lr = dict(scalars["train/lr"])
    assert math.isclose(lr[2], 0.05, rel_tol=1e-6) and math.isclose(lr[2 * steps_per_epoch + 2], 0.005, rel_tol=1e-6)
    # the resolved config is stored as hyper-parameters
    hparams = next((out / "tracking" / "fasttrain").glob("*/hparams.yml"))
    saved = yaml.safe_load(hparams.read_text())
    assert saved["lr"] == 0.05 and saved["milestone_epochs"] == "[2]" and saved["log_with"] == "tensorboard"


def test_missing_tracker_package_is_one_clear_error(monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    with pytest.raises(RuntimeError, match=r"mlflow is not installed; pip install mlflow"):
        tracking.tracker_names("tensorboard,mlflow")
    with pytest.raises(ValueError, match="unknown tracker"):
        tracking.tracker_names("tensorbord")
    assert tracking.tracker_names("none") == [] and tracking.tracker_names("tensorboard") == ["tensorboard"]
    assert "mlflow" not in tracking.tracker_names("all")


@pytest.mark.slow
def test_wandb_offline_and_mlflow_reopen_the_same_run_on_resume(tiny_raw, tmp_path, monkeypatch):
    import importlib.util
    names = [n for n, module in (("wandb", "wandb"), ("mlflow", "alembic")) if importlib.util.find_spec(module)]
    if not names:
        pytest.skip("neither wandb nor mlflow (with its database backend) is installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    assert fit(tiny_raw, out, epochs=2, stop_after_epochs=1, log_with=",".join(names)) == "stopped"
    ids = json.loads((out / "tracking" / "run_ids.json").read_text())
    assert fit(tiny_raw, out, epochs=2, resume=str(out), log_with=",".join(names)) == "done"
    assert json.loads((out / "tracking" / "run_ids.json").read_text()) == ids
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if "wandb" in names:   # one run id, two offline attempts to sync into it
        attempts = sorted((out / "tracking" / "wandb").glob("offline-run-*"))
        assert len(attempts) == 2 and all(a.name.endswith(f"-{ids['wandb']}") for a in attempts)
        assert all((a / f"run-{ids['wandb']}.wandb").stat().st_size > 0 for a in attempts)
    if "mlflow" in names:  # one MLflow run holds both epochs, and the config as parameters
        import mlflow
        client = mlflow.tracking.MlflowClient(f"sqlite:///{(out / 'tracking' / 'mlflow.db').resolve()}")
        history = client.get_metric_history(ids["mlflow"], "eval/top1")
        assert [(m.step, m.value) for m in history] == [(5, records[0]["eval_top1"]), (10, records[1]["eval_top1"])]
        assert client.get_run(ids["mlflow"]).data.params["lr"] == "0.05"
