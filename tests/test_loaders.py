"""The four loaders behind build_loader, on tiny datasets written by data_prep.convert.write_dataset."""
import io
import shutil

import numpy as np
import pytest
import torch
from data_prep_fixtures import resize_center_crop
from PIL import Image

from data_prep.convert import write_dataset
from fasttrain.data import augment as A
from fasttrain.data import build_loader
from fasttrain.data.batch import Batch
from fasttrain.data.shards import ShardReader, decode_rgb
from fasttrain.dataset import DatasetDir, DatasetError

KINDS = ["ffcv", "dali", "torch", "device"]
RAW_COUNTS = [64, 32, 20, 14]                  # long-tailed train split, 130 samples
JPEG_SIZE = 32


def source_index(n, offset):
    return offset + 3 * np.arange(n)            # distinct from positions, so a mix-up shows


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    rng = np.random.default_rng(0)
    train_labels = rng.permutation(np.repeat(np.arange(4), RAW_COUNTS))
    images = {name: rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
              for name, n in (("train", 130), ("test", 45), ("unlabeled", 60))}
    labels = {"train": train_labels, "test": np.arange(45) % 4, "unlabeled": rng.integers(0, 4, 60)}
    splits = {name: {"images": images[name], "labels": labels[name],
                     "source_index": source_index(len(labels[name]), 1000 * (i + 1))}
              for i, name in enumerate(images)}
    out = write_dataset(tmp_path_factory.mktemp("raw") / "ds", splits, num_classes=4, encoding="raw",
                        shard_size=50, workers=2)
    return DatasetDir(out), images


def smooth_jpeg(rng, label):
    h, w = rng.integers(40, 100, size=2)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([40 + 50 * label + 40 * yy, 128 + 60 * np.sin(3 * xx + rng.uniform(0, 3)),
                    90 + 80 * xx * yy], -1)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory):
    rng = np.random.default_rng(1)
    splits = {}
    for i, (name, n) in enumerate((("train", 40), ("test", 18))):
        labels = np.arange(n) % 4
        splits[name] = {"images": [smooth_jpeg(rng, y) for y in labels], "labels": labels,
                        "source_index": source_index(n, 1000 * (i + 1))}
    out = write_dataset(tmp_path_factory.mktemp("jpeg") / "ds", splits, num_classes=4, encoding="jpeg",
                        max_side=64, shard_size=16, workers=2)
    return DatasetDir(out)


def loader(ds, kind, split="train", **kw):
    args = dict(batch_size=16, views=[A.small_eval()], train=False, workers=2)
    return build_loader(ds, split, kind=kind, **{**args, **kw})


def pixels(ds, view):
    """Undo the normalization: 0-255 floats."""
    return view * A.stats(ds.std, "cpu") + A.stats(ds.mean, "cpu")


def cat(batches, field="indices"):
    return torch.cat([getattr(b, field) for b in batches]).numpy()


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.labels, y.labels) and torch.equal(x.indices, y.indices)
        assert len(x.views) == len(y.views) and all(torch.equal(u, v) for u, v in zip(x.views, y.views))


# ---------------------------------------------------------------- raw sets: exact


def test_raw_set_all_loaders_yield_bit_identical_batches(raw):
    ds, _ = raw
    runs = {}
    for kind in KINDS:
        ld = loader(ds, kind, train=True, sampler="balanced", views=[A.small_train(), A.moco_v2(16)],
                    seed=3, rank=1, world_size=2)
        ld.set_epoch(2)
        runs[kind] = list(ld)
        assert len(runs[kind]) == len(ld) == 130 // 2 // 16
        assert all(isinstance(b, Batch) and len(b) == 16 for b in runs[kind])
    for kind in KINDS[1:]:
        assert_same_batches(runs["ffcv"], runs[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_raw_eval_is_exact_and_two_ranks_cover_every_sample_once(raw, kind):
    ds, images = raw
    split = ds.split("test")
    seen = []
    for rank in (0, 1):
        ld = loader(ds, kind, split="test", rank=rank, world_size=2)
        batches = list(ld)
        assert len(batches) == len(ld) and [len(b) for b in batches] == ([16, 7] if rank == 0 else [16, 6])
        block = np.array_split(np.arange(45), 2)[rank]
        assert np.array_equal(cat(batches), split.source_index[block])
        assert np.array_equal(cat(batches, "labels"), split.labels[block])
        expected = torch.from_numpy(images["test"][block]).permute(0, 3, 1, 2).float()
        got = torch.cat([b.images for b in batches])
        assert got.dtype == torch.float32 and got.shape == (len(block), 3, 16, 16)
        assert torch.allclose(pixels(ds, got), expected, atol=1e-3)
        seen.append(cat(batches))
    assert sorted(np.concatenate(seen)) == sorted(split.source_index)


@pytest.mark.parametrize("kind", KINDS)
def test_train_shards_are_disjoint(raw, kind):
    ds, _ = raw
    shards = [cat(loader(ds, kind, train=True, rank=r, world_size=2, views=[A.small_train()]))
              for r in (0, 1)]
    assert [len(s) for s in shards] == [64, 64]                       # 130 // 2 = 65, drop_last
    assert len(np.unique(np.concatenate(shards))) == 128
    assert set(np.concatenate(shards)) <= set(ds.split("train").source_index)


@pytest.mark.parametrize("kind", KINDS)
def test_set_epoch_determinism(raw, kind):
    ds, _ = raw
    ld = loader(ds, kind, train=True, views=[A.small_train()], seed=7)
    ld.set_epoch(4)
    first, again = list(ld), list(ld)
    ld.set_epoch(5)
    other = list(ld)
    assert_same_batches(first, again)
    assert not np.array_equal(cat(first), cat(other))
    assert not torch.equal(first[0].images, other[0].images)


def test_balanced_sampler_through_a_loader(raw):
    ds, _ = raw
    ld = loader(ds, "device", train=True, sampler="balanced", batch_size=26)
    labels = np.concatenate([cat((ld.set_epoch(e), list(ld))[1], "labels") for e in range(10)])
    np.testing.assert_allclose(np.bincount(labels) / len(labels), 0.25, atol=0.04)
    sqrt = loader(ds, "device", train=True, sampler="sqrt", batch_size=26)
    labels = np.concatenate([cat((sqrt.set_epoch(e), list(sqrt))[1], "labels") for e in range(10)])
    expected = np.sqrt(RAW_COUNTS) / np.sqrt(RAW_COUNTS).sum()
    np.testing.assert_allclose(np.bincount(labels) / len(labels), expected, atol=0.04)


@pytest.mark.parametrize("kind", ["ffcv", "device"])
def test_positions_subset_and_sampling_labels(raw, kind):
    ds, _ = raw
    split = ds.split("unlabeled")
    with pytest.raises(ValueError, match="sampling_labels"):
        list(loader(ds, kind, split="unlabeled", train=True, sampler="balanced"))
    positions = np.arange(0, 60, 2)                                   # e.g. confident pseudo-labels
    pseudo = np.where(np.arange(60) < 40, 0, 1)                       # per position of the split
    ld = loader(ds, kind, split="unlabeled", train=True, sampler="balanced", batch_size=10,
                positions=positions, sampling_labels=pseudo)
    batches = [b for e in range(6) for b in (ld.set_epoch(e), list(ld))[1]]
    indices = cat(batches)
    assert set(indices) <= set(split.source_index[positions])
    assert (cat(batches, "labels") == -1).all()                        # file labels, not pseudo-labels
    drawn = np.searchsorted(split.source_index, indices)
    assert 0.35 < (pseudo[drawn] == 1).mean() < 0.65                   # balanced over pseudo-labels
    with pytest.raises(ValueError, match="one per position"):
        loader(ds, kind, split="unlabeled", train=True, sampling_labels=pseudo[:10])


@pytest.mark.parametrize("kind", ["ffcv", "device"])
@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_channels_last(raw, jpeg, kind, encoding):
    ds, views = (raw[0], [A.small_eval()]) if encoding == "raw" else (jpeg, [A.large_eval(JPEG_SIZE)])
    a = next(iter(loader(ds, kind, split="test", views=views)))
    b = next(iter(loader(ds, kind, split="test", views=views, channels_last=True)))
    assert a.images.is_contiguous() and b.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a.images, b.images)


# ---------------------------------------------------------------- jpeg sets: close to a PIL reference


def pil_eval_reference(data, size):
    """torchvision's Resize(round(size / 0.875)) + CenterCrop(size), with PIL."""
    crop = resize_center_crop(decode_rgb(data), round(size / 0.875), size)
    return torch.from_numpy(crop).permute(2, 0, 1).float()


@pytest.mark.parametrize("kind", KINDS)
def test_jpeg_eval_is_close_to_a_pil_reference(jpeg, kind):
    reader = ShardReader(jpeg.require_files("test", "dali"))
    batches = list(loader(jpeg, kind, split="test", views=[A.large_eval(JPEG_SIZE)]))
    assert [len(b) for b in batches] == [16, 2]
    got = pixels(jpeg, torch.cat([b.images for b in batches]))
    reference = torch.stack([pil_eval_reference(reader.image_bytes(p), JPEG_SIZE) for p in range(18)])
    assert got.shape == reference.shape == (18, 3, JPEG_SIZE, JPEG_SIZE)
    assert (got - reference).abs().mean() < 2.0          # measured: ffcv 0.98, dali 0.12, torch 0.01, device 0.25
    split = jpeg.split("test")
    assert np.array_equal(cat(batches), split.source_index)
    assert np.array_equal(cat(batches, "labels"), split.labels)


@pytest.mark.parametrize("kind", KINDS)
def test_jpeg_train_views(jpeg, kind):
    ld = loader(jpeg, kind, train=True, views=[A.large_train(JPEG_SIZE), A.moco_v2(24)], batch_size=8,
                rank=1, world_size=2, seed=2)
    ld.set_epoch(1)
    batches = list(ld)
    assert len(batches) == len(ld) == 2
    low = (0 - A.stats(jpeg.mean, "cpu")) / A.stats(jpeg.std, "cpu")
    high = (255 - A.stats(jpeg.mean, "cpu")) / A.stats(jpeg.std, "cpu")
    for b in batches:
        assert [tuple(v.shape) for v in b.views] == [(8, 3, JPEG_SIZE, JPEG_SIZE), (8, 3, 24, 24)]
        for v in b.views:
            assert v.dtype == torch.float32 and torch.isfinite(v).all()
            assert (v >= low - 1e-3).all() and (v <= high + 1e-3).all() and v.std() > 0.1
    positions = ld.epoch_positions(1)
    split = jpeg.split("train")
    assert np.array_equal(cat(batches), split.source_index[positions])
    assert np.array_equal(cat(batches, "labels"), split.labels[positions])
    assert np.array_equal(cat(list(ld)), cat(batches))                  # same epoch, same order


@pytest.mark.parametrize("kind", ["dali", "torch", "device"])
def test_jpeg_crops_are_a_function_of_seed_epoch_rank(jpeg, kind):
    """FFCV draws its jpeg crops and flips from numba's per-thread generators: not reproducible, and
    left out here (its order is: see test_jpeg_train_views)."""
    ld = loader(jpeg, kind, train=True, views=[A.large_train(JPEG_SIZE)], batch_size=8, seed=4)
    ld.set_epoch(3)
    first, again = list(ld), list(ld)
    ld.set_epoch(4)
    assert_same_batches(first, again)
    assert not torch.equal(first[0].images, list(ld)[0].images)


# ---------------------------------------------------------------- errors and shard reading


@pytest.mark.parametrize("kind", KINDS)
def test_missing_files_raise_dataset_error(raw, kind, tmp_path):
    ds, _ = raw
    copy = tmp_path / "ds"
    shutil.copytree(ds.root, copy)
    (copy / "train.beton").unlink()
    shutil.rmtree(copy / "dali" / "train")
    with pytest.raises(DatasetError, match="--formats"):
        loader(DatasetDir(copy), kind)


def test_bad_arguments(raw, jpeg):
    ds, _ = raw
    with pytest.raises(ValueError, match="kind"):
        loader(ds, "webdataset")
    with pytest.raises(ValueError, match="crop='rrc'"):
        loader(jpeg, "dali", views=[A.small_train()])
    with pytest.raises(ValueError, match="rank"):
        loader(ds, "device", rank=2, world_size=2)


def test_shard_reader_matches_the_meta_arrays_and_pixels(raw):
    ds, images = raw
    reader = ShardReader(ds.require_files("train", "dali"))
    split = ds.split("train")
    assert len(reader) == 130 and reader.is_raw and len(reader.tars) == 3
    assert [reader.label(p) for p in range(130)] == split.labels.tolist()
    assert [reader.source_index(p) for p in range(130)] == split.source_index.tolist()
    assert np.array_equal(reader.raw_images((16, 16, 3)), images["train"])


def test_shard_reader_reads_index_version_1_1(raw, tmp_path):
    ds, images = raw
    copy = tmp_path / "train"
    shutil.copytree(ds.root / "dali" / "train", copy)
    for idx in copy.glob("*.idx"):                  # v1.1: "ext offset size" per component, no names
        lines = idx.read_text().split("\n")
        body = [" ".join(t for i, t in enumerate(line.split()) if i % 4 != 3) for line in lines[1:]]
        idx.write_text("\n".join([lines[0].replace("v1.2", "v1.1")] + body))
    assert np.array_equal(ShardReader(copy).raw_images((16, 16, 3)), images["train"])


def test_importing_ffcv_keeps_torch_threads():
    import subprocess
    import sys
    # a bare `import ffcv...` calls torch.set_num_threads(1) (ffcv.pipeline.compiler)
    code = "import torch; torch.set_num_threads(2); import fasttrain.data.ffcv_loader; print(torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "2"


def test_torch_loader_workers_are_not_forked_from_the_trainer(jpeg):
    """A fork of a process that holds threads (torch/OpenMP pools, DALI, numba) can copy a held lock and hang
    the worker forever: the workers must be children of a fork server, never of this process."""
    import os
    loader = build_loader(jpeg, "train", kind="torch", batch_size=8, views=[A.large_train(24)], train=True,
                          workers=2)
    loader.set_epoch(0)
    batches = sum(1 for _ in loader)
    workers = loader.loader._iterator._workers      # persistent: still alive after the epoch
    parents = {int(open(f"/proc/{w.pid}/stat").read().rsplit(")", 1)[1].split()[1]) for w in workers}
    assert batches == len(loader) and len(workers) == 2
    assert os.getpid() not in parents and len(parents) == 1, parents


def test_ffcv_loader_keeps_the_processs_torch_threads(raw):
    """FFCV's Loader sets torch's process-wide thread count to its workers when built and at every epoch;
    the training step must keep the count the engine chose (it prints it, and runs compare bit for bit)."""
    ds, _ = raw
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        ld = loader(ds, "ffcv", train=True, views=[A.small_train()], workers=1)
        assert torch.get_num_threads() == 3
        ld.set_epoch(0)
        for _ in ld:
            assert torch.get_num_threads() == 3
        ld.close()
    finally:
        torch.set_num_threads(threads)
