"""Self-training as data: pseudo-labels come from the base model only; the derived dataset is labeled +
pseudo-labeled as ONE split (complete only with its manifest, threshold only when asked); the joint stage
is an ordinary supervised run whose epoch visits every sample once, whose loss is one batch mean, whose
re-weighting counts include the pseudo-labels and whose shot groups keep the labeled counts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_RUN, TRAIN_COUNTS, fit, launch_two_processes
from fasttrain.config import Config
from fasttrain.data import augment, build_loader
from fasttrain.dataset import DatasetDir, DatasetError, Split
from fasttrain.engine import Engine
from fasttrain.losses import class_balanced_weights, ldam_margins
from fasttrain.pseudo_label import load_classifier, pseudo_label, write_pseudo_dataset

HERE = Path(__file__).parent
POOL = 160


def write_table(path, data, label, confidence=None, threshold=0.0):
    split = DatasetDir(data).split("unlabeled")
    n = split.num_samples
    np.savez(path, position=np.arange(n), source_index=split.source_index, label=np.asarray(label),
             confidence=np.ones(n, np.float32) if confidence is None else np.asarray(confidence, np.float32),
             threshold=np.float32(threshold))
    return path


def made_up_labels(data):
    """Pseudo-labels that are neither -1 nor the pool's true labels, and skewed: class 3 gets most."""
    source = DatasetDir(data).split("unlabeled").source_index
    return np.where(source % 5 == 0, (source // 5) % 3, 3)


@pytest.fixture(scope="module")
def base_run(tiny_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "ce"
    assert fit(tiny_raw, out, epochs=2) == "done"
    return out


@pytest.fixture(scope="module")
def joint_data(tiny_raw, tmp_path_factory):
    """tiny_raw's labeled set + its whole pool with made-up pseudo-labels."""
    tmp = tmp_path_factory.mktemp("joint")
    table = write_table(tmp / "pseudo_labels.npz", tiny_raw, made_up_labels(tiny_raw))
    return write_pseudo_dataset(tiny_raw, table, tmp / "data", workers=1)


# ---------------------------------------------------------------- pseudo-labels


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
    joint = DatasetDir(write_pseudo_dataset(data, tmp_path / "deleted" / "pseudo_labels.npz", tmp_path / "j",
                                            workers=1))
    assert np.array_equal(joint.split("train").labels[-POOL:], deleted["label"])


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


# ---------------------------------------------------------------- the derived dataset


def test_derived_train_split_is_labeled_plus_every_pool_sample(tiny_raw, joint_data):
    base, joint = DatasetDir(tiny_raw), DatasetDir(joint_data)
    labeled, pool, train = base.split("train"), base.split("unlabeled"), joint.split("train")
    pseudo = made_up_labels(tiny_raw)
    assert set(joint.manifest["splits"]) == {"train", "test"}   # the pool is used up: no unlabeled split
    assert train.num_samples == labeled.num_samples + POOL
    assert np.array_equal(train.source_index, np.concatenate([labeled.source_index, pool.source_index]))
    assert np.array_equal(train.labels, np.concatenate([labeled.labels, pseudo]))
    joint_counts = np.asarray(TRAIN_COUNTS) + np.bincount(pseudo, minlength=4)
    assert train.class_counts == joint_counts.tolist() and joint.shot_counts() == TRAIN_COUNTS
    counts = joint.manifest["pseudo_labeled"]["counts"]
    assert (counts["labeled"], counts["pool"], counts["pseudo"], counts["joint"]) == (90, POOL, POOL, 90 + POOL)
    assert counts["pseudo_per_class"] == np.bincount(pseudo, minlength=4).tolist()
    provenance = joint.manifest["pseudo_labeled"]
    assert provenance["base_dataset"] == str(Path(tiny_raw).resolve())
    assert provenance["base_manifest_sha256"].startswith("sha256:") and provenance["threshold"] == 0.0
    assert joint.image == base.image                           # the base set's normalisation
    # test is the base's split, referenced (not copied)
    assert joint.split("test").ffcv_path.resolve() == base.split("test").ffcv_path.resolve()
    assert not (Path(joint_data) / "test.beton").exists()
    assert np.array_equal(joint.split("test").labels, base.split("test").labels)
    # the pixels are the base set's: same image for the same source index, in both formats
    views = [augment.small_eval()]
    for kind in ("ffcv", "dali"):
        got = {int(i): x for b in build_loader(joint, "train", kind=kind, batch_size=50, views=views, train=False,
                                               workers=1) for i, x in zip(b.indices, b.images)}
        want = {int(i): x for split in ("train", "unlabeled") for b in build_loader(
            base, split, kind=kind, batch_size=50, views=views, train=False, workers=1)
            for i, x in zip(b.indices, b.images)}
        assert got.keys() == want.keys() and all(torch.equal(got[i], want[i]) for i in got), kind


def test_threshold_keeps_only_confident_samples(tiny_raw, tmp_path):
    pool = DatasetDir(tiny_raw).split("unlabeled")
    confidence = np.random.default_rng(0).random(POOL)
    table = write_table(tmp_path / "p.npz", tiny_raw, made_up_labels(tiny_raw), confidence)
    joint = DatasetDir(write_pseudo_dataset(tiny_raw, table, tmp_path / "data", threshold=0.6, workers=1))
    kept = pool.source_index[confidence >= 0.6]
    assert 0 < len(kept) < POOL
    train = joint.split("train")
    assert np.array_equal(train.source_index[90:], kept)
    assert joint.manifest["pseudo_labeled"]["counts"]["pseudo"] == len(kept)
    assert joint.manifest["pseudo_labeled"]["threshold"] == 0.6
    with pytest.raises(ValueError, match="no pseudo-label has confidence"):
        write_pseudo_dataset(tiny_raw, table, tmp_path / "none", threshold=1.5, workers=1)


def test_derived_directory_is_complete_only_with_its_manifest(tiny_raw, tmp_path, monkeypatch):
    table = write_table(tmp_path / "p.npz", tiny_raw, made_up_labels(tiny_raw))
    import data_prep.convert

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(data_prep.convert, "_checksums", crash)   # after the data files, before the manifest
    with pytest.raises(KeyboardInterrupt):
        write_pseudo_dataset(tiny_raw, table, tmp_path / "data", workers=1)
    assert list(tmp_path.iterdir()) == [tmp_path / "p.npz"]       # no `data`, no temporary left behind
    monkeypatch.undo()
    (tmp_path / "data").mkdir()                                    # an empty leftover is replaced
    out = write_pseudo_dataset(tiny_raw, table, tmp_path / "data", workers=1)
    assert (out / "manifest.json").exists() and DatasetDir(out).split("train").num_samples == 90 + POOL
    with pytest.raises(FileExistsError, match="already holds"):
        write_pseudo_dataset(tiny_raw, table, tmp_path / "data", workers=1)
    (out / "manifest.json").unlink()
    with pytest.raises(DatasetError, match="manifest.json is missing"):
        DatasetDir(out)


def test_pseudo_label_table_must_match_the_pool(tiny_raw, tmp_path):
    short = tmp_path / "short.npz"
    np.savez(short, position=np.arange(5), source_index=np.arange(5), label=np.zeros(5, int),
             confidence=np.ones(5), threshold=np.float32(0))
    with pytest.raises(DatasetError, match="do not match the 160 samples"):
        write_pseudo_dataset(tiny_raw, short, tmp_path / "a", workers=1)
    with pytest.raises(DatasetError, match="labels outside"):
        write_pseudo_dataset(tiny_raw, write_table(tmp_path / "bad.npz", tiny_raw, np.full(POOL, 4)),
                             tmp_path / "b", workers=1)


# ---------------------------------------------------------------- the joint stage: a supervised run


@pytest.mark.parametrize("loader", ["device", "torch", "ffcv", "dali"])
def test_joint_epoch_visits_every_labeled_and_pool_sample_once(tiny_raw, joint_data, loader):
    engine = Engine(Config(data=str(joint_data), out="unused").update(TINY_RUN | dict(loader=loader, batch_size=50)))
    seen, real_loss = [], engine.method.loss
    engine.method.loss = lambda model, batch, epoch: seen.append(batch) or real_loss(model, batch, epoch)
    engine.train_epoch(0)
    base = DatasetDir(tiny_raw)
    want = dict(zip(base.split("train").source_index.tolist(), base.split("train").labels.tolist()))
    want |= dict(zip(base.split("unlabeled").source_index.tolist(), made_up_labels(tiny_raw).tolist()))
    assert [len(b) for b in seen] == [50] * 5                  # 250 samples, one pass, one stream of batches
    indices = torch.cat([b.indices for b in seen]).tolist()
    assert sorted(indices) == sorted(want)                     # every labeled and every pool sample, once
    assert torch.cat([b.labels for b in seen]).tolist() == [want[i] for i in indices]
    assert indices != sorted(indices)                          # shuffled: labeled and pool samples mixed
    assert any((b.indices < 10_000).any() and (b.indices >= 10_000).any() for b in seen)


def test_joint_loss_is_the_plain_batch_mean(joint_data):
    engine = Engine(Config(data=str(joint_data), out="unused").update(TINY_RUN | dict(batch_size=50)))
    batch = next(iter(engine.train_loader))
    loss, logs = engine.method.loss(engine.model, batch, 0)
    assert set(logs) == {"loss"}
    torch.testing.assert_close(loss, F.cross_entropy(engine.model(batch.images), batch.labels))


def test_reweighting_counts_include_pseudo_labels_and_shot_groups_use_labeled_counts(joint_data, tmp_path):
    joint = DatasetDir(joint_data)
    counts = joint.split("train").class_counts
    assert counts != TRAIN_COUNTS
    engine = Engine(Config(data=str(joint_data), out=str(tmp_path / "ldam")).update(
        TINY_RUN | dict(loss="ldam", head="cosine", reweight="cb", batch_size=50)))
    criterion = engine.method.criterion
    torch.testing.assert_close(criterion.loss.margins.flatten(), ldam_margins(counts).flatten())
    torch.testing.assert_close(criterion.loss.weight, class_balanced_weights(counts).to(criterion.loss.weight))
    assert engine.fit() == "done"
    metrics = json.loads((tmp_path / "ldam" / "metrics.json").read_text())
    assert metrics["train_class_counts"] == TRAIN_COUNTS       # many/medium/few by the labeled counts
    assert metrics["num_eval_images"] == 64                    # the base set's test split


def test_semi_chain_base_pseudo_joint_with_method_flags_for_the_joint_stage_only(tiny_raw, tmp_path):
    """recipes/semi_cifar_lt.py's stages on tiny data: the joint stage trains on RUN/pseudo/data with the
    method flags (plain and from --config); the base model that makes the pseudo-labels keeps its preset's
    method (CE, linear head) and takes --set base.*; every other flag reaches every stage."""
    import sys
    sys.path.insert(0, str(HERE.parent / "recipes"))
    from semi_cifar_lt import STAGES

    from fasttrain.chain import run_chain
    (tmp_path / "method.yaml").write_text("cb_beta: 0.99\nfocal_gamma: 3.0\n")
    run = tmp_path / "run"
    args = ["--data", str(tiny_raw), "--out", str(run), "--epochs", "1", "--arch", "resnet20", "--width",
            "0.25", "--batch-size", "25", "--warmup-epochs", "0", "--milestones", "", "--workers", "1",
            "--loss", "ldam", "--reweight", "drw", "--sampler", "resample", "--ldam-scale", "20",
            "--config", str(tmp_path / "method.yaml"), "--set", "base.loss=focal"]
    assert run_chain(STAGES, "semi", args) == "done"
    base, joint = (Config.load(run / stage / "config.yaml") for stage in ("base", "joint"))
    assert joint.method == "supervised" and joint.data == str(run / "pseudo" / "data")
    assert (joint.loss, joint.head, joint.reweight, joint.sampler, joint.ldam_scale, joint.cb_beta,
            joint.focal_gamma) == ("ldam", "auto", "drw", "resample", 20.0, 0.99, 3.0)
    assert (base.loss, base.head, base.reweight, base.sampler, base.ldam_scale, base.cb_beta,
            base.focal_gamma) == ("focal", "auto", "none", "uniform", 30.0, 0.9999, 1.0)
    assert (base.epochs, base.batch_size, base.width) == (joint.epochs, joint.batch_size, joint.width) == (1, 25, 0.25)
    heads = [torch.load(run / stage / "model.pt", weights_only=True)["head"] for stage in ("base", "joint")]
    assert heads == ["linear", "cosine"]                       # --loss ldam's cosine head: the joint model only
    table = np.load(run / "pseudo" / "pseudo_labels.npz")
    assert str(table["base_run"]) == str((run / "base").resolve())
    data = DatasetDir(run / "pseudo" / "data")
    assert np.array_equal(data.split("train").labels[90:], table["label"])
    assert (run / "joint" / "DONE").exists()
    assert json.loads((run / "joint" / "metrics.json").read_text())["train_class_counts"] == TRAIN_COUNTS


@pytest.mark.slow
def test_two_processes_label_their_blocks_and_gather_the_whole_pool(tiny_raw, base_run, tmp_path):
    one = np.load(pseudo_label(base_run, tiny_raw, tmp_path / "one", loader="ffcv", batch_size=16, workers=1))
    launch_two_processes(HERE / "scripts" / "pseudo_label_two_procs.py", base_run, tiny_raw, tmp_path / "two",
                         timeout=300)
    two = np.load(tmp_path / "two" / "pseudo_labels.npz")
    for key in ("position", "source_index", "label"):
        assert np.array_equal(one[key], two[key]), key
    np.testing.assert_allclose(one["confidence"], two["confidence"], rtol=1e-5)
