"""write_dataset: both formats read back exactly (raw) / within JPEG tolerance, manifest, atomic writes."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from data_prep_fixtures import class_images, jpeg_bytes, natural_image, read_dali, read_ffcv

import data_prep.convert as convert_mod
from data_prep import ConvertError
from data_prep.convert import write_dataset
from fasttrain.dataset import DatasetDir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw_set(tmp_path_factory):
    x, y = class_images([30, 20, 10], (6, 5, 3))
    xu, yu = class_images([12, 8, 4], (6, 5, 3), seed=3)
    splits = {"train": {"images": x, "labels": y, "source_index": np.arange(len(y)) * 2},
              "unlabeled": {"images": xu, "labels": yu, "source_index": 1000 + np.arange(len(yu)),
                            "requested_class_counts": [12, 10, 4]},
              "test": {"images": x[:9], "labels": y[:9]}}
    out = write_dataset(tmp_path_factory.mktemp("raw") / "ds", splits, num_classes=3, encoding="raw",
                        shard_size=16, class_names=["a", "b", "c"], workers=2)
    return out, splits


def test_raw_manifest_and_meta(raw_set):
    out, splits = raw_set
    ds = DatasetDir(out)
    m = ds.manifest
    assert ds.is_raw and ds.channels == 3 and ds.class_names == ["a", "b", "c"]
    assert (m["image"]["height"], m["image"]["width"]) == (6, 5)
    x = splits["train"]["images"].reshape(-1, 3).astype(float)
    assert np.allclose(ds.mean, x.mean(0), atol=1e-3) and np.allclose(ds.std, x.std(0), atol=1e-3)
    train, unl = ds.split("train"), ds.split("unlabeled")
    assert train.class_counts == [30, 20, 10] and train.labeled
    assert np.array_equal(train.labels, splits["train"]["labels"])
    assert np.array_equal(train.source_index, splits["train"]["source_index"])
    assert not unl.labeled and np.all(unl.labels == -1)
    assert np.array_equal(unl.true_labels(), splits["unlabeled"]["labels"])
    assert m["splits"]["unlabeled"]["class_counts"] == [12, 8, 4]
    assert m["splits"]["unlabeled"]["shortfall"] == [0, 2, 0]
    assert m["format_version"] == 1 and set(m["versions"]) == {"fasttrain", "ffcv", "nvidia-dali", "numpy"}
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m["checksums"]) == written
    for rel, digest in m["checksums"].items():
        assert digest == "sha256:" + hashlib.sha256((out / rel).read_bytes()).hexdigest()
    for split in ("train", "unlabeled", "test"):
        assert ds.require_files(split, "ffcv").is_file() and ds.require_files(split, "dali").is_dir()


@pytest.mark.parametrize("split", ["train", "unlabeled"])
def test_raw_both_formats_read_back_exactly(raw_set, split):
    out, splits = raw_set
    x, y, idx = splits[split]["images"], splits[split]["labels"], splits[split]["source_index"]
    y = y if split == "train" else np.full_like(y, -1)
    fx, fy, fi = read_ffcv(out / f"{split}.beton")
    assert np.array_equal(fx, x) and np.array_equal(fy, y) and np.array_equal(fi, idx)
    dx, dy, di = read_dali(out / "dali" / split)
    assert np.array_equal(np.stack(dx).reshape(x.shape), x)
    assert np.array_equal(dy, y) and np.array_equal(di, idx)


def test_shards_hold_consecutive_positions_and_wds2idx_index(raw_set):
    out, _ = raw_set
    tars = sorted((out / "dali" / "train").glob("*.tar"))
    assert [t.name for t in tars] == [f"shard-{i:06d}.tar" for i in range(4)]  # 60 samples / 16
    import tarfile
    with tarfile.open(tars[1]) as t:
        assert t.getnames()[:3] == ["000000016.img.u8", "000000016.cls", "000000016.idx"]
    wds2idx = pytest.importorskip("wds2idx")  # DALI's own index tool: our .idx must be identical
    ref = tars[1].with_suffix(".ref")
    wds2idx.IndexCreator(str(tars[1]), str(ref), verbose=False).create_index()
    assert ref.read_text() == tars[1].with_suffix(".idx").read_text()
    ref.unlink()


def test_jpeg_from_arrays_bytes_and_paths(tmp_path):
    rng = np.random.default_rng(0)
    imgs = np.stack([natural_image(rng, 60, 80) for _ in range(12)])
    for k, img in enumerate(imgs[8:]):
        (tmp_path / f"{k}.jpg").write_bytes(jpeg_bytes(img))
    items = list(imgs[:4]) + [jpeg_bytes(i) for i in imgs[4:8]] + [str(tmp_path / f"{k}.jpg") for k in range(4)]
    labels = np.arange(12) % 3
    out = write_dataset(tmp_path / "ds", {"train": {"images": items, "labels": labels}}, num_classes=3,
                        encoding="jpeg", max_side=40, jpeg_quality=90, workers=2, shard_size=5)
    ds = DatasetDir(out)
    assert ds.image["height"] is None and ds.image["max_side"] == 40 and ds.channels == 3
    from PIL import Image
    expected = np.stack([np.asarray(Image.fromarray(i).resize((40, 30), Image.BICUBIC)) for i in imgs])
    fx, fy, fi = read_ffcv(out / "train.beton", jpeg=True)
    dx, dy, di = read_dali(out / "dali" / "train", jpeg=True)
    assert fx.shape == expected.shape and np.stack(dx).shape == expected.shape
    assert np.abs(fx.astype(int) - expected).mean() < 8 and np.abs(np.stack(dx).astype(int) - expected).mean() < 8
    assert np.array_equal(fy, labels) and np.array_equal(dy, labels)
    assert np.array_equal(fi, np.arange(12)) and np.array_equal(di, np.arange(12))
    assert np.allclose(ds.mean, expected.reshape(-1, 3).mean(0), atol=4)


def test_bad_arguments(tmp_path):
    x, y = class_images([3, 3])
    with pytest.raises(ConvertError, match="label 5 at position 0 is out of range"):
        write_dataset(tmp_path / "a", {"train": {"images": x, "labels": np.r_[5, y[1:]]}}, num_classes=2,
                      encoding="raw")
    with pytest.raises(ConvertError, match="class 1 has no images"):
        write_dataset(tmp_path / "a", {"train": {"images": x, "labels": np.zeros(6, int)}}, num_classes=2,
                      encoding="raw")
    with pytest.raises(ConvertError, match="unknown format"):
        write_dataset(tmp_path / "a", {"train": {"images": x, "labels": y}}, num_classes=2, encoding="raw",
                      formats=("tfrecord",))
    assert not any(tmp_path.iterdir())


def test_existing_output_needs_overwrite(tmp_path):
    x, y = class_images([3, 3])
    splits = {"train": {"images": x, "labels": y}}
    out = write_dataset(tmp_path / "ds", splits, num_classes=2, encoding="raw", formats=("dali",))
    with pytest.raises(ConvertError, match="already holds a converted dataset.*--overwrite"):
        write_dataset(out, splits, num_classes=2, encoding="raw", formats=("dali",))
    splits["train"]["labels"] = y[::-1].copy()
    write_dataset(out, splits, num_classes=2, encoding="raw", formats=("dali",), overwrite=True)
    assert np.array_equal(DatasetDir(out).split("train").labels, y[::-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_failure_midway_leaves_nothing_and_rerun_succeeds(tmp_path, monkeypatch):
    x, y = class_images([3, 3])
    splits = {"train": {"images": x, "labels": y}, "test": {"images": x, "labels": y}}
    real = convert_mod.write_dali

    def fail_on_test(out_dir, *a, **k):
        if out_dir.name == "test":
            raise RuntimeError("disk full")
        return real(out_dir, *a, **k)

    monkeypatch.setattr(convert_mod, "write_dali", fail_on_test)
    with pytest.raises(RuntimeError, match="disk full"):
        write_dataset(tmp_path / "ds", splits, num_classes=2, encoding="raw", formats=("dali",))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(convert_mod, "write_dali", real)
    ds = DatasetDir(write_dataset(tmp_path / "ds", splits, num_classes=2, encoding="raw", formats=("dali",)))
    assert sorted(ds.manifest["splits"]) == ["test", "train"] and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert np.array_equal(ds.split("test").labels, y) and ds.split("test").dali_dir.is_dir()


def test_killed_conversion_leaves_no_manifest_and_rerun_cleans_up(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        import data_prep.convert as c
        real = c.write_dali
        def killed(out_dir, *a, **k):
            real(out_dir, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        c.write_dali = killed
        x = np.zeros((4, 2, 2, 1), np.uint8)
        c.write_dataset({str(tmp_path / 'ds')!r}, {{"train": {{"images": x, "labels": [0, 1, 0, 1]}}}},
                        num_classes=2, encoding="raw", formats=("dali",))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "ds").exists() and not list(tmp_path.rglob("manifest.json"))
    stale = list(tmp_path.glob(".ds.tmp-*"))
    assert len(stale) == 1
    x, y = class_images([2, 2])
    DatasetDir(write_dataset(tmp_path / "ds", {"train": {"images": x, "labels": y}}, num_classes=2,
                             encoding="raw", formats=("dali",)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_manifest_written_last_and_is_valid_json(tmp_path, monkeypatch):
    """When manifest.json appears (the rename of its .part file), every other file is complete."""
    seen = {}
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name == "manifest.json.part":
            seen.update({p.relative_to(Path(src).parent).as_posix(): p.stat().st_size
                         for p in Path(src).parent.rglob("*") if p.is_file() and p.name != "manifest.json.part"})
        real_replace(src, dst)

    monkeypatch.setattr(convert_mod.os, "replace", replace)
    x, y = class_images([5, 3])
    out = write_dataset(tmp_path / "ds", {"train": {"images": x, "labels": y}, "test": {"images": x, "labels": y}},
                        num_classes=2, encoding="raw", workers=1)
    final = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    assert seen and seen == {k: v for k, v in final.items() if k != "manifest.json"}
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["splits"]) == ["train", "test"] and set(m["checksums"]) == set(seen)
    assert m["splits"]["train"]["dali"] == "dali/train" and m["splits"]["train"]["ffcv"] == "train.beton"
    assert not list(out.glob("*.part")) and not list(out.glob(".*"))
