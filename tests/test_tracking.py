"""Experiment tracking through Accelerate's trackers: the TensorBoard event files, read back with
TensorBoard's own reader, hold the values of metrics.jsonl on one global-step axis that a resumed run
continues; W&B (offline) and MLflow (SQLite) hold the same curves in one run each across a resume; a missing
tracker package is one clear error naming the pip command."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

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


def wandb_records(path: Path):
    """The records of a W&B run file (`run-ID.wandb`): W&B's LevelDB-log framing (a 7-byte file header, then
    records of a 7-byte header - CRC, length, kind - and a protobuf, split over 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
        if kind == 0:                                        # the rest of a block is padding
            pos += room
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):                                   # a whole record, or its last part
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def wandb_run(directory: Path) -> tuple[list[str], dict[str, list[tuple[int, float]]]]:
    """Run ids of the offline attempts, oldest first, and the curves they logged together (numbers only)."""
    ids, curves = [], {}
    for path in sorted(directory.glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.append(record.run.run_id)
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                for tag, value in row.items():
                    if not tag.startswith("_") and isinstance(value, (int, float)):
                        curves.setdefault(tag, []).append((row["_step"], float(value)))
    return ids, curves


def same_curves(curves: dict, reference: dict) -> None:
    """Every curve of `reference` (TensorBoard's) in `curves`: the same steps, once each, the same values."""
    for tag, points in reference.items():
        assert [s for s, _ in curves[tag]] == [s for s, _ in points], tag
        assert all(math.isclose(v, w, rel_tol=1e-6) for (_, v), (_, w) in zip(curves[tag], points)), tag


@pytest.mark.slow
def test_wandb_offline_and_mlflow_continue_the_same_curves_on_resume(tiny_raw, tmp_path, monkeypatch):
    """Stopped after 2 of 3 epochs and resumed: W&B (offline) and MLflow (SQLite) keep one run each, under the
    same id, whose per-step and per-epoch curves are TensorBoard's (checked against metrics.jsonl above) and
    hold metrics.jsonl's values at each epoch's step, every step once."""
    import importlib.util
    if not (importlib.util.find_spec("wandb") and importlib.util.find_spec("mlflow") and importlib.util.find_spec("alembic")):
        pytest.skip("wandb / mlflow-skinny / sqlalchemy / alembic are not installed: pip install -e '.[test]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    run = dict(epochs=3, log_every=2, log_with="tensorboard,wandb,mlflow")
    assert fit(tiny_raw, out, stop_after_epochs=2, **run) == "stopped"
    ids = json.loads((out / "tracking" / "run_ids.json").read_text())
    assert fit(tiny_raw, out, resume=str(out), **run) == "done"
    assert json.loads((out / "tracking" / "run_ids.json").read_text()) == ids

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reference = read_scalars(out / "tracking" / "fasttrain")
    epoch_steps = [s for s, _ in reference["epoch"]]
    assert len(epoch_steps) == 3 and len(reference["train/loss"]) > 3          # per-step points between epochs

    attempts, wandb_curves = wandb_run(out / "tracking" / "wandb")
    assert attempts == [ids["wandb"]] * 2                       # both attempts log into the one run
    same_curves(wandb_curves, reference)

    import mlflow
    client = mlflow.tracking.MlflowClient(f"sqlite:///{(out / 'tracking' / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name(tracking.PROJECT).experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]]       # no second run opened by the resume
    mlflow_curves = {tag: sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], tag))
                     for tag in reference}
    same_curves(mlflow_curves, reference)
    assert client.get_run(ids["mlflow"]).data.params["lr"] == "0.05"

    for curves in (wandb_curves, mlflow_curves):                # each epoch's values at its step
        for record, step in zip(records, epoch_steps):
            for key, tag in (("loss", "epoch/loss"), ("lr", "epoch/lr"), ("eval_top1", "eval/top1"),
                             ("eval_few", "eval/few")):
                assert math.isclose(dict(curves[tag])[step], record[key], rel_tol=1e-6), (tag, step)
