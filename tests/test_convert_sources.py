"""The converters on tiny files in each source's real on-disk format, plus the real split files / Fashion-MNIST."""
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_prep_fixtures import (make_cifar10, make_cifar100, make_fmnist, make_folder, make_imagenet, make_inat,
                                make_svhn, make_tinyimages, read_dali, read_ffcv)
from PIL import Image

from data_prep import ConvertError
from data_prep.convert import convert, main
from data_prep.longtail import class_counts, unlabeled_counts
from data_prep.sources import read_split_file
from fasttrain.dataset import DatasetDir

REPO = Path(__file__).resolve().parents[1]
SPLITS = Path(__file__).resolve().parents[1] / "data_prep" / "splits"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def run(*args):
    return DatasetDir(convert([str(a) for a in args] + ["--workers", "2"]))


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory):
    return make_fmnist(tmp_path_factory.mktemp("fmnist"))


def test_val_per_class_is_balanced_disjoint_and_the_same_for_every_pool(fmnist_root, tmp_path):
    args = ["--source", "fmnist", "--root", fmnist_root, "--profile", "exp", "--rho", 10, "--max-per-class", 20,
            "--unlabeled-factor", 2, "--val-per-class", 3, "--formats", "dali"]
    u1, u10 = run(*args, "--rho-u", 1, "--out", tmp_path / "u1"), run(*args, "--rho-u", 10, "--out", tmp_path / "u10")
    for ds in (u1, u10):
        val, train, pool = ds.split("val"), ds.split("train"), ds.split("unlabeled")
        assert val.class_counts == [3] * 10 and np.bincount(val.labels).tolist() == [3] * 10
        assert not set(val.source_index) & (set(train.source_index) | set(pool.source_index))
        assert ds.manifest["longtail"]["val_per_class"] == 3
    assert np.array_equal(u1.split("val").source_index, u10.split("val").source_index)
    assert np.array_equal(u1.split("train").source_index, u10.split("train").source_index)
    with pytest.raises(ConvertError, match="--val-per-class 1000: class"):
        run(*args, "--rho-u", 1, "--val-per-class", 1000, "--out", tmp_path / "too_many")


def test_fmnist_longtail_pool_and_determinism(fmnist_root, tmp_path):
    args = ["--source", "fmnist", "--root", fmnist_root, "--profile", "exp", "--rho", 10, "--max-per-class", 20,
            "--rho-u", 10, "--unlabeled-factor", 2, "--formats", "dali"]
    ds = run(*args, "--seed", 0, "--out", tmp_path / "a")
    train, unl = ds.split("train"), ds.split("unlabeled")
    counts = class_counts(10, 20, "exp", 10)
    assert train.class_counts == counts and np.bincount(train.labels).tolist() == counts
    assert not set(train.source_index) & set(unl.source_index)  # pool = train images not selected
    requested = unlabeled_counts(10, 2 * sum(counts), 10)
    m = ds.manifest["splits"]["unlabeled"]
    assert m["requested_class_counts"] == requested and unl.class_counts == requested
    assert m["shortfall"] == [0] * 10 and np.all(unl.labels == -1)
    assert ds.manifest["longtail"] == {"profile": "exp", "rho": 10, "max_per_class": 20, "rho_u": 10,
                                       "unlabeled_factor": 2, "seed": 0}
    assert ds.split("test").class_counts == [5] * 10 and ds.manifest["command"].startswith("python -m data_prep")
    same, other = run(*args, "--seed", 0, "--out", tmp_path / "b"), run(*args, "--seed", 1, "--out", tmp_path / "c")
    assert np.array_equal(same.split("train").source_index, train.source_index)
    assert np.array_equal(same.split("unlabeled").source_index, unl.source_index)
    assert not np.array_equal(other.split("train").source_index, train.source_index)
    assert same.manifest["checksums"] == ds.manifest["checksums"]  # dali + meta files are byte-identical
    # pixels of the selected samples are the source's pixels at those indices
    src = gzip.decompress((fmnist_root / "train-images-idx3-ubyte.gz").read_bytes())[16:]
    src = np.frombuffer(src, np.uint8).reshape(-1, 28, 28)
    x, _, idx = read_dali(ds.split("train").dali_dir)
    assert np.array_equal(np.stack(x).reshape(-1, 28, 28), src[idx])


@pytest.mark.parametrize("profile,expected", [("step", [20] * 5 + [2] * 5), ("none", [20] * 10)])
def test_fmnist_profiles(fmnist_root, tmp_path, profile, expected):
    ds = run("--source", "fmnist", "--root", fmnist_root, "--profile", profile, "--rho", 10, "--max-per-class", 20,
             "--unlabeled-factor", 0, "--formats", "dali", "--out", tmp_path / "d")
    assert ds.split("train").class_counts == expected and not ds.has_split("unlabeled")


def test_real_fashion_mnist(tmp_path):
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("real Fashion-MNIST not installed")
    ds = run("--source", "fmnist", "--root", FMNIST, "--rho", 10, "--max-per-class", 30, "--unlabeled-factor", 1,
             "--out", tmp_path / "fm")
    assert ds.split("train").class_counts == class_counts(10, 30, "exp", 10) and ds.split("test").num_samples == 10000
    assert ds.class_names[0] == "T-shirt/top" and 60 < ds.mean[0] < 90 and 80 < ds.std[0] < 100
    x, y, idx = read_ffcv(ds.split("train").ffcv_path)
    assert x.shape[1:] == (28, 28, 1) and np.array_equal(y, ds.split("train").labels)
    assert np.array_equal(idx, ds.split("train").source_index)


def test_cifar10_with_tinyimages_pool_and_shortfall(tmp_path):
    d, x, y = make_cifar10(tmp_path / "src")
    make_tinyimages(tmp_path / "ti.pkl", [40] * 5 + [1] * 5)
    args = ["--source", "cifar10", "--root", tmp_path / "src", "--unlabeled-file", tmp_path / "ti.pkl",
            "--max-per-class", 30, "--rho", 10, "--unlabeled-factor", 1, "--out", tmp_path / "out"]
    with pytest.raises(ConvertError, match=r"the unlabeled pool \(tinyimages\) cannot supply what --unlabeled-factor 1 "
                                           r"--rho-u 10 asks for: needs 112 images, has 98 of them \(class 5 needs 8, "
                                           r"has 1, .*--allow-smaller-pool"):
        run(*args)
    assert not (tmp_path / "out").exists()
    ds = run(*args, "--allow-smaller-pool")
    train, unl = ds.split("train"), ds.split("unlabeled")
    assert ds.manifest["unlabeled_pool"] == {"name": "tinyimages", "size": 205, "source_index_offset": 400,
                                             "requested": 112, "selected": 98, "allow_smaller_pool": True}
    assert ds.class_names[3] == "c3" and train.class_counts == class_counts(10, 30, "exp", 10)
    requested = unlabeled_counts(10, sum(train.class_counts), 10)
    m = ds.manifest["splits"]["unlabeled"]
    assert m["requested_class_counts"] == requested
    assert m["shortfall"] == [max(r - (40 if c < 5 else 1), 0) for c, r in enumerate(requested)]
    assert unl.source_index.min() >= 400 and ds.manifest["unlabeled_pool"]["source_index_offset"] == 400
    fx, fy, fi = read_ffcv(ds.split("train").ffcv_path)
    assert np.array_equal(fx, x[fi]) and np.array_equal(fy, y[fi])
    dx, dy, di = read_dali(ds.split("unlabeled").dali_dir)
    ti = np.load(tmp_path / "ti.pkl", allow_pickle=True)
    assert np.array_equal(np.stack(dx).reshape(-1, 32, 32, 3), ti["data"][di - 400]) and np.all(dy == -1)
    assert np.array_equal(unl.true_labels(), ti["extrapolated_targets"][di - 400])


def test_cifar10_pool_without_tinyimages_needs_the_pool_file_or_the_flag(tmp_path):
    make_cifar10(tmp_path / "src")
    args = ["--source", "cifar10", "--root", tmp_path / "src", "--max-per-class", 30, "--rho", 10, "--rho-u", 1,
            "--unlabeled-factor", 5, "--formats", "dali", "--out", tmp_path / "out"]
    with pytest.raises(ConvertError, match=r"pool \(train_not_selected\) cannot supply what --unlabeled-factor 5 "
                                           r"--rho-u 1 asks for: needs 590 images, has 282 of them .*pass "
                                           r"--unlabeled-file with the TinyImages pool"):
        run(*args)
    ds = run(*args, "--allow-smaller-pool")
    pool = ds.manifest["unlabeled_pool"]
    assert pool["requested"] == 590 and pool["selected"] == 282 and pool["allow_smaller_pool"] is True
    assert sum(ds.manifest["splits"]["unlabeled"]["shortfall"]) == 590 - 282


def test_cifar100(tmp_path):
    make_cifar100(tmp_path / "src")
    ds = run("--source", "cifar100", "--root", tmp_path / "src", "--max-per-class", 10, "--rho", 5,
             "--unlabeled-factor", 0, "--formats", "ffcv", "--out", tmp_path / "out")
    assert ds.num_classes == 100 and ds.class_names[99] == "f99"
    assert ds.split("train").class_counts == class_counts(100, 10, "exp", 5)
    assert ds.split("test").num_samples == 200


def test_svhn_with_extra(tmp_path):
    make_svhn(tmp_path / "src")
    ds = run("--source", "svhn", "--root", tmp_path / "src", "--max-per-class", 30, "--rho", 10, "--rho-u", 1,
             "--unlabeled-factor", 1, "--formats", "dali", "--out", tmp_path / "out")
    train, unl = ds.split("train"), ds.split("unlabeled")
    rolled = class_counts(10, 30, "exp", 10)  # head to tail: digits 1, 2, ..., 9, 0 (label 10 is digit 0)
    assert train.class_counts == rolled[-1:] + rolled[:-1]
    assert ds.manifest["unlabeled_pool"] == {"name": "svhn_extra", "size": 500, "source_index_offset": 300,
                                             "requested": 110, "selected": 110, "allow_smaller_pool": False}
    assert unl.source_index.min() >= 300 and sum(unl.class_counts) == sum(unlabeled_counts(10, train.num_samples, 1))
    from scipy.io import loadmat
    extra = loadmat(tmp_path / "src" / "extra_32x32.mat")
    x, _, idx = read_dali(unl.dali_dir)
    assert np.array_equal(np.stack(x).reshape(-1, 32, 32, 3), extra["X"].transpose(3, 0, 1, 2)[idx - 300])
    assert np.array_equal(unl.true_labels(), extra["y"].ravel()[idx - 300] % 10)


def test_imagenet_lt_odd_files_pool_val_test(tmp_path):
    root, splits, pixels = make_imagenet(tmp_path / "imnet")
    ds = run("--source", "imagenet_lt", "--root", root, "--num-classes", 4, "--split-file", splits["train"],
             "--val-split-file",
             splits["val"], "--test-split-file", splits["test"], "--max-side", 32, "--unlabeled-factor", 1,
             "--rho-u", 1, "--shard-size", 7, "--out", tmp_path / "out")
    assert ds.class_names == [f"n{1440764 + c:08d}" for c in range(4)] and ds.image["encoding"] == "jpeg"
    train = ds.split("train")
    assert train.class_counts == [8, 5, 3, 2] and ds.manifest["longtail"]["profile"] == "split-file"
    assert ds.split("val").class_counts == [3] * 4 and ds.split("test").class_counts == [3] * 4
    lines = splits["train"].read_text().split()[::2]
    unl = ds.split("unlabeled")
    assert unl.source_index.min() >= len(lines) and unl.class_counts == unlabeled_counts(4, 18, 1)
    assert ds.manifest["splits"]["unlabeled"]["shortfall"] == [0, 0, 0, 0]
    expected = np.stack([np.asarray(Image.fromarray(pixels[str(root / lines[i])]).resize((32, 24), Image.BICUBIC))
                         for i in train.source_index])  # includes CMYK, grayscale and PNG-named-.JPEG files
    fx, fy, fi = read_ffcv(train.ffcv_path, jpeg=True)
    dx, dy, di = read_dali(train.dali_dir, jpeg=True)
    for x in (fx, np.stack(dx)):
        assert x.shape == expected.shape and np.abs(x.astype(int) - expected).mean() < 8
    assert np.array_equal(fy, train.labels) and np.array_equal(dy, train.labels) and np.array_equal(di, fi)


def test_imagenet_lt_bad_images(tmp_path):
    root, splits, _ = make_imagenet(tmp_path / "imnet", classes=2, per_class=(4, 1, 1), lt=(3, 2))
    victim = root / splits["train"].read_text().split()[0]
    victim.write_bytes(victim.read_bytes()[:200])
    args = ["--source", "imagenet_lt", "--root", root, "--num-classes", 2, "--split-file", splits["train"],
            "--max-side", 32,
            "--unlabeled-factor", 0, "--formats", "dali", "--out", tmp_path / "out"]
    with pytest.raises(ConvertError, match=f"1 bad image\\(s\\): {victim} \\(line 1 of .*ImageNet_LT_train.txt\\): "
                                          f"unreadable or truncated image.*--skip-bad"):
        run(*args)
    assert not (tmp_path / "out").exists()
    ds = run(*args, "--skip-bad")
    assert ds.manifest["skipped"][0]["file"].startswith(f"{victim} (line 1 of ")
    assert ds.split("train").class_counts == [2, 2]
    victim.unlink()
    with pytest.raises(ConvertError, match=f"{victim} \\(line 1 of .*\\): missing file"):
        run(*args[:-2], "--out", tmp_path / "out2")
    with pytest.raises(ConvertError, match="--profile exp: the imagenet_lt train set is already long-tailed"):
        run(*args, "--profile", "exp", "--out", tmp_path / "out3")
    with pytest.raises(ConvertError, match="--max-per-class: the imagenet_lt train set is already long-tailed"):
        run(*args, "--max-per-class", 2, "--out", tmp_path / "out3")


def test_inat2018(tmp_path):
    root, train_split, val_split = make_inat(tmp_path / "inat")
    ds = run("--source", "inat2018", "--root", root, "--num-classes", 4, "--split-file", train_split,
             "--val-split-file", val_split,
             "--formats", "dali", "--out", tmp_path / "out")
    assert ds.split("train").class_counts == [6, 4, 2, 1] and ds.split("val").class_counts == [1] * 4
    assert ds.class_names[0] == "Plantae/7291" and not ds.has_split("unlabeled") and ds.eval_split() == "val"
    x, y, _ = read_dali(ds.split("train").dali_dir, jpeg=True)
    assert x[0].shape == (40, 30, 3) and np.array_equal(y, ds.split("train").labels)


@pytest.mark.parametrize("with_test", [True, False])
def test_folder(tmp_path, with_test):
    make_folder(tmp_path / "f", with_test=with_test)
    args = ["--source", "folder", "--root", tmp_path / "f", "--profile", "none", "--unlabeled-factor", 0.5,
            "--rho-u", 1, "--formats", "dali", "--out", tmp_path / "out"]
    with pytest.raises(ConvertError, match=r"pool \(train_not_selected\) cannot supply .* needs 6 images, has 3 "
                                           r"of them \(class 1 needs 2, has 1, class 2 needs 2, has 0\)"):
        run(*args)
    ds = run(*args, "--allow-smaller-pool")
    assert ds.class_names == ["class_0", "class_1", "class_2"] and ds.split("train").class_counts == [4, 4, 4]
    assert ds.has_split("test") == with_test and ds.split("unlabeled").class_counts == [2, 1, 0]
    assert ds.manifest["splits"]["unlabeled"]["shortfall"] == [0, 1, 2]  # asked 2 each, 6-4, 5-4, 4-4 left


def test_real_split_files_parse():
    if not SPLITS.is_dir():
        pytest.skip("no shared split files")
    for name, n, classes in (("ImageNet_LT_val", 20000, 1000), ("ImageNet_LT_test", 50000, 1000),
                             ("iNaturalist18_val", 24426, 8142)):
        paths, labels = read_split_file(SPLITS / f"{name}.txt.gz")
        assert len(paths) == len(labels) == n and labels.max() + 1 == classes
    paths, _ = read_split_file(SPLITS / "ImageNet_LT_test.txt.gz")
    assert paths[0].startswith("val/n01440764/")


# ---------------------------------------------------------------- defaults: the paper's pools and normalisation


def test_default_pool_only_where_the_paper_has_one(tmp_path, fmnist_root):
    assert not run("--source", "fmnist", "--root", fmnist_root, "--rho", 10, "--max-per-class", 20, "--formats",
                   "dali", "--out", tmp_path / "fm").has_split("unlabeled")
    make_cifar100(tmp_path / "c100")                      # leftover train images cannot supply 5x: no pool
    c100 = ["--source", "cifar100", "--root", tmp_path / "c100", "--max-per-class", 10, "--rho", 5, "--formats", "dali"]
    ds = run(*c100, "--out", tmp_path / "c100_out")
    assert not ds.has_split("unlabeled") and ds.manifest["longtail"]["unlabeled_factor"] == 0
    assert "unlabeled_pool" not in ds.manifest
    with pytest.raises(ConvertError, match=r"pool \(train_not_selected\) cannot supply what --unlabeled-factor 5"):
        run(*c100, "--unlabeled-factor", 5, "--out", tmp_path / "c100_asked")   # asked for: still an error
    root, splits, _ = make_imagenet(tmp_path / "imnet")  # the rest of ImageNet (train/) is not a default pool
    ds = run("--source", "imagenet_lt", "--root", root, "--num-classes", 4, "--split-file", splits["train"],
             "--max-side", 32, "--formats", "dali", "--out", tmp_path / "imnet_out")
    assert not ds.has_split("unlabeled") and ds.manifest["longtail"]["unlabeled_factor"] == 0
    make_cifar10(tmp_path / "c10")
    make_tinyimages(tmp_path / "ti.pkl", [150] * 10)
    c10 = ["--source", "cifar10", "--root", tmp_path / "c10", "--max-per-class", 30, "--rho", 10, "--formats", "dali"]
    assert not run(*c10, "--out", tmp_path / "c10_out").has_split("unlabeled")
    ds = run(*c10, "--unlabeled-file", tmp_path / "ti.pkl", "--out", tmp_path / "c10_ti")
    assert ds.manifest["unlabeled_pool"]["name"] == "tinyimages" and ds.manifest["longtail"]["unlabeled_factor"] == 5
    assert ds.split("unlabeled").num_samples == sum(unlabeled_counts(10, 5 * ds.split("train").num_samples, 10))
    make_folder(tmp_path / "f")
    assert not run("--source", "folder", "--root", tmp_path / "f", "--profile", "none", "--formats", "dali",
                   "--out", tmp_path / "f_out").has_split("unlabeled")
    with pytest.raises(ConvertError, match=r"--allow-smaller-pool with --unlabeled-factor 0 \(the default for "
                                           r"cifar100\): there is no pool"):
        run(*c100, "--allow-smaller-pool", "--out", tmp_path / "c100_flag")


# The paper's transforms.Normalize constants (train.py / train_semi.py: CIFAR, else 0.5; imagenet_inat/data/
# dataloader.py: ImageNet and iNaturalist 2018), on the 0-255 scale of the manifest.
PAPER_CONSTANTS = {"cifar10": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
                   "cifar100": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
                   "svhn": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
                   "imagenet_lt": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
                   "inat2018": ([0.466, 0.471, 0.380], [0.195, 0.194, 0.192])}


def convert_tiny(source: str, root: Path, out: Path) -> DatasetDir:
    if source == "imagenet_lt":
        _, splits, _ = make_imagenet(root)
        return run("--source", source, "--root", root, "--num-classes", 4, "--split-file", splits["train"],
                   "--max-side", 32, "--formats", "dali", "--out", out)
    if source == "inat2018":
        _, train, _ = make_inat(root)
        return run("--source", source, "--root", root, "--num-classes", 4, "--split-file", train,
                   "--formats", "dali", "--out", out)
    {"cifar10": make_cifar10, "cifar100": make_cifar100, "svhn": make_svhn, "fmnist": make_fmnist,
     "folder": make_folder}[source](root)
    return run("--source", source, "--root", root, "--max-per-class", 4, "--rho", 2, "--unlabeled-factor", 0,
               "--formats", "dali", "--out", out)


@pytest.mark.parametrize("source", ["cifar10", "cifar100", "svhn", "imagenet_lt", "inat2018", "fmnist", "folder"])
def test_normalisation_is_the_papers_constants_where_it_has_them_else_the_train_splits(source, tmp_path):
    ds = convert_tiny(source, tmp_path / "src", tmp_path / "out")
    if source in PAPER_CONSTANTS:
        mean, std = PAPER_CONSTANTS[source]
        assert ds.normalization == ds.manifest["image"]["normalization"] == "paper"
        np.testing.assert_allclose(ds.mean, np.array(mean) * 255, atol=1e-4)
        np.testing.assert_allclose(ds.std, np.array(std) * 255, atol=1e-4)
        return
    x = np.concatenate([np.asarray(img, np.float64).reshape(-1, ds.channels)
                        for img in read_dali(ds.split("train").dali_dir, jpeg=not ds.is_raw)[0]])
    assert ds.normalization == "train_split"
    np.testing.assert_allclose(ds.mean, x.mean(0), atol=1e-3 if ds.is_raw else 1.0)
    np.testing.assert_allclose(ds.std, x.std(0), atol=1e-3 if ds.is_raw else 1.0)


@pytest.mark.parametrize("kind", ["ffcv", "torch"])
def test_loaders_normalise_svhn_with_the_papers_half_and_half(tmp_path, kind):
    make_svhn(tmp_path / "src")
    ds = run("--source", "svhn", "--root", tmp_path / "src", "--max-per-class", 30, "--rho", 10,
             "--unlabeled-factor", 0, "--out", tmp_path / "out")
    from fasttrain.data import augment, build_loader
    batches = list(build_loader(ds, "test", kind=kind, batch_size=16, views=[augment.small_eval()], train=False,
                                workers=1))
    pixels = np.stack(read_dali(ds.split("test").dali_dir)[0]).reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2)
    got = np.concatenate([b.images.numpy() for b in batches])
    np.testing.assert_allclose(got, (pixels / 255 - 0.5) / 0.5, atol=1e-5)


# ---------------------------------------------------------------- bad input


def test_bad_sources(tmp_path, fmnist_root):
    with pytest.raises(ConvertError, match="unknown source 'mnist'"):
        run("--source", "mnist", "--root", tmp_path, "--out", tmp_path / "o")
    with pytest.raises(ConvertError, match="missing source file .*train-images-idx3-ubyte.gz"):
        run("--source", "fmnist", "--root", tmp_path, "--out", tmp_path / "o")
    bad = tmp_path / "trunc"
    bad.mkdir()
    for f in fmnist_root.iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(gzip.compress(gzip.decompress(data)[:-100]) if "train-images" in f.name else data)
    with pytest.raises(ConvertError, match="train-images-idx3-ubyte.gz: truncated"):
        run("--source", "fmnist", "--root", bad, "--out", tmp_path / "o")
    with pytest.raises(ConvertError, match="class 0 has 80 images but the long-tail profile asks for 300"):
        run("--source", "fmnist", "--root", fmnist_root, "--max-per-class", 300, "--out", tmp_path / "o")
    with pytest.raises(ConvertError, match="--profile exp with n_max 50 and --rho 100 leaves class 8 with 0 images"):
        run("--source", "fmnist", "--root", fmnist_root, "--max-per-class", 50, "--rho", 100, "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_bad_labels_and_empty_classes(tmp_path):
    root, train_split, _ = make_inat(tmp_path / "inat")
    with pytest.raises(ConvertError, match="iNaturalist18_train.txt:13: label 3 is out of range: inat2018 has 3 "
                                           "classes"):
        run("--source", "inat2018", "--root", root, "--split-file", train_split, "--num-classes", 3,
            "--out", tmp_path / "o")
    with pytest.raises(ConvertError, match="class 4 \\(4\\) has no training images"):
        run("--source", "inat2018", "--root", root, "--split-file", train_split, "--num-classes", 5,
            "--out", tmp_path / "o")
    (tmp_path / "bad.txt").write_text("train_val2018/a.jpg seven\n")
    with pytest.raises(ConvertError, match="bad.txt:1: expected `<relative path> <label>`"):
        run("--source", "inat2018", "--root", root, "--split-file", tmp_path / "bad.txt", "--out", tmp_path / "o")
    make_folder(tmp_path / "f", with_test=False)
    (tmp_path / "f" / "class_3").mkdir()
    with pytest.raises(ConvertError, match="class 3 \\(class_3\\) has no training images"):
        run("--source", "folder", "--root", tmp_path / "f", "--out", tmp_path / "o")


def test_cli_one_line_error_exit_2_and_overwrite(tmp_path, fmnist_root, capsys):
    assert main(["--source", "nope", "--root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown source 'nope'") and "\n" not in err
    args = ["--source", "fmnist", "--root", str(fmnist_root), "--unlabeled-factor", "0", "--formats", "dali",
            "--max-per-class", "10", "--rho", "10", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    proc = subprocess.run([sys.executable, "-m", "data_prep.convert", *args], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("pass --overwrite (overwrite=True) to replace it, or pick another --out")
    assert main(args + ["--overwrite", "--seed", "3"]) == 0
    assert DatasetDir(tmp_path / "o").manifest["longtail"]["seed"] == 3


# ---------------------------------------------------------------- SVHN-LT exactly as the paper's code builds it


def paper_svhn_counts(imb_type: str, imb_factor: float, unlabel_imb_factor: float):
    """Per-label (digit) labeled and unlabeled counts, transcribed from the paper's dataset/imbalance_svhn.py
    (SemiSupervisedImbalanceSVHN: get_img_num_per_cls, get_img_num_per_cls_unlabeled, gen_imbalanced_data)."""
    cls_num, img_max, unlabel_size_factor = 10, 1000, 5
    img_num_per_cls = []
    if imb_type == "exp":
        for cls_idx in range(cls_num):
            img_num_per_cls.append(int(img_max * (imb_factor ** (cls_idx / (cls_num - 1.0)))))
    else:  # step
        img_num_per_cls = [int(img_max)] * (cls_num // 2) + [int(img_max * imb_factor)] * (cls_num // 2)
    img_unlabeled_total = np.sum(img_num_per_cls) * unlabel_size_factor
    img_first_min = img_unlabeled_total // cls_num
    unl = [int(img_first_min * (unlabel_imb_factor ** (i / (cls_num - 1.0)))) for i in range(cls_num)]
    factor = img_unlabeled_total / np.sum(unl)
    unl = [int(num * factor) for num in unl]
    classes = np.unique(np.arange(10))
    classes = np.concatenate([classes[1:], classes[:1]], axis=0)  # "shift label 0 to the last"
    labeled = dict(zip(classes.tolist(), img_num_per_cls))
    unlabeled = dict(zip(classes.tolist(), unl))
    return [labeled[i] for i in range(10)], [unlabeled[i] for i in range(10)]


@pytest.fixture(scope="module")
def svhn_big(tmp_path_factory):
    """SVHN .mat files in the original layout with 2 x 2 images: 1,000 train and 10,500 extra images per digit."""
    return make_svhn(tmp_path_factory.mktemp("svhn"), per_class=(1000, 2, 10500), shape=(2, 2, 3))


@pytest.mark.parametrize("profile,rho,rho_u", [("exp", 50, 1), ("exp", 100, 100), ("step", 50, 1), ("step", 100, 100)])
def test_svhn_lt_matches_the_papers_class_counts(svhn_big, tmp_path, profile, rho, rho_u):
    labeled, unlabeled = paper_svhn_counts(profile, 1 / rho, 1 / rho_u)
    ds = run("--source", "svhn", "--root", svhn_big, "--profile", profile, "--rho", rho, "--rho-u", rho_u,
             "--formats", "ffcv", "--out", tmp_path / "out")
    m = ds.manifest
    assert m["splits"]["train"]["class_counts"] == labeled and labeled[0] == min(labeled)  # digit 0 rarest
    assert labeled[1] == 1000 and m["longtail"]["max_per_class"] == 1000
    assert m["splits"]["unlabeled"]["class_counts"] == unlabeled
    assert m["splits"]["unlabeled"]["requested_class_counts"] == unlabeled
    assert m["splits"]["unlabeled"]["shortfall"] == [0] * 10
    assert m["unlabeled_pool"]["name"] == "svhn_extra" and m["longtail"]["unlabeled_factor"] == 5
    assert np.array_equal(np.bincount(ds.split("train").labels, minlength=10), labeled)
    assert np.array_equal(np.bincount(ds.split("unlabeled").true_labels(), minlength=10), unlabeled)


def test_svhn_lt_expected_lists():
    """The paper's lists themselves (so that a change to the transcription above is noticed)."""
    assert paper_svhn_counts("exp", 1 / 100, 1)[0] == [10, 1000, 599, 359, 215, 129, 77, 46, 27, 16]
    assert paper_svhn_counts("exp", 1 / 50, 1)[0] == [20, 1000, 647, 419, 271, 175, 113, 73, 47, 30]
    assert paper_svhn_counts("step", 1 / 50, 1)[0] == [20, 1000, 1000, 1000, 1000, 1000, 20, 20, 20, 20]
