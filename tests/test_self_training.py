"""Self-training: pseudo-labels come from the base model only, the joint batch and loss, clear errors,
and the whole base -> pseudo-label -> joint chain with several losses, samplers and loaders."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_RUN, fit, launch_two_processes, reset_accelerate
from fasttrain.config import Config
from fasttrain.data import augment, build_loader
from fasttrain.dataset import DatasetDir, DatasetError, Split
from fasttrain.engine import Engine
from fasttrain.methods.self_training import load_classifier, pseudo_label

HERE = Path(__file__).parent
def engine_for(data, pseudo, **overrides):
    return Engine(Config(data=str(data), out="unused").update(
        TINY_RUN | {"method": "self_training", "pseudo_labels": str(pseudo)} | overrides))


def write_table(path, data, label, confidence=None, threshold=0.0):
    split = DatasetDir(data).split("unlabeled")
    n = split.num_samples
    np.savez(path, position=np.arange(n), source_index=split.source_index, label=np.asarray(label),
             confidence=np.ones(n, np.float32) if confidence is None else np.asarray(confidence, np.float32),
             threshold=np.float32(threshold))
    return path


@pytest.fixture(scope="module")
def base_run(tiny_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "ce"
    assert fit(tiny_raw, out, epochs=2) == "done"
    return out


def test_pseudo_labels_are_the_models_argmax(tiny_raw, base_run, tmp_path):
    path = pseudo_label(base_run, tiny_raw, tmp_path, loader="ffcv", batch_size=32, workers=1)
    assert path == tmp_path / "pseudo_labels.npz" and not list(tmp_path.glob(".*"))
    z = np.load(path)
    dataset = DatasetDir(tiny_raw)
    split = dataset.split("unlabeled")
    model, _ = load_classifier(base_run)
    batches = build_loader(dataset, "unlabeled", kind="torch", batch_size=50, views=[augment.small_eval()],
                           train=False, workers=1)
    with torch.no_grad():
        probs = torch.cat([model.eval()(b.images).softmax(1) for b in batches])
    assert np.array_equal(z["position"], np.arange(split.num_samples))
    assert np.array_equal(z["source_index"], split.source_index)
    assert np.array_equal(z["label"], probs.argmax(1).numpy())
    np.testing.assert_allclose(z["confidence"], probs.max(1).values.numpy(), rtol=1e-5)
    assert float(z["threshold"]) == 0.0 and str(z["base_run"]) == str(base_run.resolve())


def test_true_labels_of_the_pool_are_never_read(tiny_raw, base_run, tmp_path, monkeypatch):
    reference = np.load(pseudo_label(base_run, tiny_raw, tmp_path / "reference", workers=1))
    data = tmp_path / "data"
    shutil.copytree(tiny_raw, data)
    true = data / "unlabeled.true_labels.npy"
    np.save(true, np.random.default_rng(1).permutation(np.load(true)) + 1)
    scrambled = np.load(pseudo_label(base_run, data, tmp_path / "scrambled", workers=1))
    true.unlink()
    monkeypatch.setattr(Split, "true_labels", lambda self: pytest.fail("the pool's true labels were read"))
    deleted = np.load(pseudo_label(base_run, data, tmp_path / "deleted", workers=1))
    for key in ("position", "source_index", "label", "confidence"):
        assert np.array_equal(reference[key], scrambled[key]) and np.array_equal(reference[key], deleted[key])


def test_pseudo_label_errors(tiny_raw, base_run, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_raw, data)
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["splits"]["unlabeled"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="no 'unlabeled' split"):
        pseudo_label(base_run, data, tmp_path / "out", workers=1)
    with pytest.raises(FileNotFoundError, match="model.pt"):
        pseudo_label(tmp_path, tiny_raw, tmp_path / "out", workers=1)
    ssp = tmp_path / "ssp"
    assert fit(tiny_raw, ssp, method="rotation") == "done"    # 4 outputs, like the 4 classes: still refused
    with pytest.raises(ValueError, match="not a classifier"):
        pseudo_label(ssp, tiny_raw, tmp_path / "out", workers=1)


def test_joint_batch_takes_pseudo_labels_from_the_table(tiny_raw, tmp_path):
    split = DatasetDir(tiny_raw).split("unlabeled")
    n = split.num_samples
    label = (split.source_index * 7 + 1) % 4                    # made up: neither -1 nor the true labels
    confidence = np.linspace(0, 1, n)
    table = write_table(tmp_path / "p.npz", tiny_raw, label, confidence)
    engine = engine_for(tiny_raw, table, pseudo_share=0.25, pseudo_threshold=0.5, pseudo_weight=0.3)
    method, batch = engine.method, next(iter(engine.train_loader))
    assert len(batch) == 12                                     # 16 x (1 - 0.25) labeled + 4 pseudo-labeled
    calls, real_criterion, real_next = [], method.criterion, method.next_pseudo_batch
    method.criterion = lambda logits, targets, epoch: calls.append(targets) or real_criterion(logits, targets, epoch)
    pseudo = []
    method.next_pseudo_batch = lambda epoch: pseudo.append(real_next(epoch)) or pseudo[-1]
    loss, logs = method.loss(engine.model, batch, 0)
    (labeled_targets, pseudo_targets), (drawn,) = calls, pseudo
    assert torch.equal(labeled_targets, batch.labels) and len(pseudo_targets) == 4
    assert (drawn.labels == -1).all()                           # the pool's file labels...
    by_source = dict(zip(split.source_index.tolist(), label.tolist()))
    assert pseudo_targets.tolist() == [by_source[i] for i in drawn.indices.tolist()]   # ...are not used
    assert torch.allclose(loss, logs["loss_labeled"] + 0.3 * logs["loss_pseudo"])
    kept = set(split.source_index[confidence >= 0.5].tolist())
    method.pseudo_loader.set_epoch(0)
    assert {i for b in method.pseudo_loader for i in b.indices.tolist()} <= kept


def test_pseudo_stream_cycles_with_new_epochs_and_is_deterministic(tiny_raw, tmp_path):
    table = write_table(tmp_path / "p.npz", tiny_raw, np.zeros(160, int))
    engine = engine_for(tiny_raw, table, epochs=10)
    method, epochs = engine.method, []
    real_set_epoch = method.pseudo_loader.set_epoch
    method.pseudo_loader.set_epoch = lambda e: epochs.append(e) or real_set_epoch(e)
    per_pass = len(method.pseudo_loader)
    first = [method.next_pseudo_batch(3).indices for _ in range(2 * per_pass + 1)]
    assert epochs == [3, 13, 23]                                # pass p of epoch 3: loader epoch 3 + p * 10
    method.next_pseudo_batch(4)
    assert epochs[-1] == 4
    again = [method.next_pseudo_batch(3).indices for _ in range(2 * per_pass + 1)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_stopped_and_resumed_run_equals_uninterrupted(tiny_raw, tmp_path):
    table = write_table(tmp_path / "p.npz", tiny_raw, np.arange(160) % 4)
    run = dict(method="self_training", pseudo_labels=str(table), epochs=3)
    assert fit(tiny_raw, tmp_path / "full", **run) == "done"
    assert fit(tiny_raw, tmp_path / "part", stop_after_epochs=1, **run) == "stopped"
    assert fit(tiny_raw, tmp_path / "part", resume=str(tmp_path / "part"), **run) == "done"
    full, part = (torch.load(tmp_path / r / "model.pt", weights_only=True)["state_dict"] for r in ("full", "part"))
    assert all(torch.equal(full[k], part[k]) for k in full)


def test_self_training_errors(tiny_raw, tmp_path):
    with pytest.raises(ValueError, match="needs --pseudo-labels"):
        engine_for(tiny_raw, "")
    reset_accelerate()
    short = tmp_path / "short.npz"
    np.savez(short, position=np.arange(5), source_index=np.arange(5), label=np.zeros(5, int),
             confidence=np.ones(5), threshold=np.float32(0))
    with pytest.raises(DatasetError, match="do not match the 160 samples"):
        engine_for(tiny_raw, short)
    reset_accelerate()
    with pytest.raises(DatasetError, match="labels outside"):
        engine_for(tiny_raw, write_table(tmp_path / "bad.npz", tiny_raw, np.full(160, 4)))
    reset_accelerate()
    with pytest.raises(ValueError, match="too few"):
        engine_for(tiny_raw, write_table(tmp_path / "p.npz", tiny_raw, np.zeros(160, int), np.zeros(160)),
                   pseudo_threshold=0.5)
    reset_accelerate()
    with pytest.raises(ValueError, match="both parts"):
        engine_for(tiny_raw, tmp_path / "p.npz", pseudo_share=0.0)


@pytest.mark.parametrize("overrides", [
    dict(loss="ce", sampler="uniform", loader="ffcv"),
    dict(loss="ldam", head="cosine", reweight="drw", drw_epoch=1, sampler="balanced", loader="torch", epochs=2),
])
def test_base_pseudo_label_joint_chain(tiny_raw, base_run, tmp_path, overrides):
    table = pseudo_label(base_run, tiny_raw, tmp_path / "pseudo", loader=overrides["loader"], workers=1)
    assert fit(tiny_raw, tmp_path / "joint", method="self_training", pseudo_labels=str(table), **overrides) == "done"
    logs = [json.loads(line) for line in (tmp_path / "joint" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite([r["loss"], r["loss_labeled"], r["loss_pseudo"]]).all() for r in logs)
    assert json.loads((tmp_path / "joint" / "metrics.json").read_text())["num_eval_images"] == 64


@pytest.mark.slow
def test_two_processes_label_their_blocks_and_gather_the_whole_pool(tiny_raw, base_run, tmp_path):
    one = np.load(pseudo_label(base_run, tiny_raw, tmp_path / "one", loader="ffcv", batch_size=16, workers=1))
    launch_two_processes(HERE / "scripts" / "pseudo_label_two_procs.py", base_run, tiny_raw, tmp_path / "two",
                         timeout=300)
    two = np.load(tmp_path / "two" / "pseudo_labels.npz")
    for key in ("position", "source_index", "label"):
        assert np.array_equal(one[key], two[key]), key
    np.testing.assert_allclose(one["confidence"], two["confidence"], rtol=1e-5)
