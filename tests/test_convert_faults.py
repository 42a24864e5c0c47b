"""Conversion failures: a full or read-only disk, bad flags, bad images, bad labels; reproducible outputs.

Each failure must end the conversion with one line naming the file or flag and the fix, leave no partial
output behind, and never hang."""
import contextlib
import errno
import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from data_prep_fixtures import (class_images, jpeg_bytes, make_fmnist, make_folder, make_imagenet, make_inat,
                                natural_image)

import data_prep.convert as convert_mod
import data_prep.sources as sources_mod
from data_prep import ConvertError
from data_prep.convert import convert, write_dataset
from fasttrain.dataset import DatasetDir

REPO = Path(__file__).resolve().parents[1]
SPLITS = Path(__file__).resolve().parents[1] / "data_prep" / "splits"


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory):
    return make_fmnist(tmp_path_factory.mktemp("fmnist"))


def fmnist_args(root, out, *extra):
    return ["--source", "fmnist", "--root", str(root), "--max-per-class", "20", "--rho", "10",
            "--unlabeled-factor", "2", "--out", str(out), *map(str, extra)]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small tmpfs at `path` (root only; the test is skipped otherwise); always unmounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ---------------------------------------------------------------- a full disk never hangs


INJECT = textwrap.dedent("""
    import errno, sys
    import data_prep.writers as w
    target = sys.argv[1]
    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    if target == "ffcv":
        import fasttrain.ffcv_import
        import ffcv.memory_allocator as ma
        ma.MemoryAllocator.flush_page = no_space   # the FFCV page write
    else:
        w._add = no_space                          # a DALI tar member
    from data_prep.convert import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("target", ["ffcv", "dali"])
def test_injected_writer_failure_ends_with_one_line_and_removes_temp(fmnist_root, tmp_path, target):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", INJECT, target,
                           *fmnist_args(fmnist_root, out, "--formats", target, "--unlabeled-factor", 0)],
                          cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    where = f"{out}/train.beton" if target == "ffcv" else f"{out}/dali/train"
    assert err[0].startswith(f"error: no space left on the device writing {where} (split 'train' needs about ")
    assert "MB free on the file system of" in err[0] and err[0].endswith("(the partial output was removed)")
    assert leftovers(tmp_path) == []


def test_any_write_error_is_one_line_and_removes_temp(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(convert_mod, "write_dali", broken)
    x, y = class_images([3, 3])
    with pytest.raises(ConvertError, match=rf"writing {tmp_path}/ds/dali/train failed \(OSError: \[Errno 5\] "
                                           rf"Input/output error\); check the disk .*partial output was removed"):
        write_dataset(tmp_path / "ds", {"train": {"images": x, "labels": y}}, num_classes=2, encoding="raw",
                      formats=("dali",))
    assert leftovers(tmp_path) == []


class _KillsItsWorker(list):
    def __init__(self, items):
        super().__init__(items)
        self.parent = os.getpid()                   # pickled with the list: the workers see the converter's pid

    def __getitem__(self, i):
        if i == 5 and os.getpid() != self.parent:
            os._exit(1)  # a worker killed mid-job (as by the OOM killer)
        return list.__getitem__(self, i)


def test_dead_image_worker_is_an_error_not_a_hang(tmp_path):
    rng = np.random.default_rng(0)
    items = _KillsItsWorker([jpeg_bytes(natural_image(rng, 16, 16)) for _ in range(20)])
    with pytest.raises(ConvertError, match="a worker process died while preparing train images .*--workers"):
        write_dataset(tmp_path / "ds", {"train": {"images": items, "labels": np.arange(20) % 2}}, num_classes=2,
                      encoding="jpeg", formats=("dali",), workers=2)
    assert leftovers(tmp_path) == []


def test_real_full_disk_refused_before_writing(fmnist_root, tmp_path):
    with tmpfs(tmp_path / "small", "2m") as small:
        with pytest.raises(ConvertError, match=r"--out .*/small/out: needs about \d+\.\d MB but only 2\.1 MB is "
                                               r"free on the file system of .*; free space or pick another --out"):
            convert(fmnist_args(fmnist_root, small / "out"))
        assert leftovers(small) == []


@pytest.mark.parametrize("formats", ["ffcv", "dali"])
def test_real_full_disk_midway_removes_everything(fmnist_root, tmp_path, monkeypatch, formats):
    monkeypatch.setattr(convert_mod, "_require_space", lambda *a: None)  # as if the estimate were wrong
    with tmpfs(tmp_path / "small", "1m") as small:
        with pytest.raises(ConvertError, match=r"no space left on the device writing .*/small/out/"
                                               r"(train.beton|dali/train) \(split 'train' needs about \d+\.\d "
                                               r"MB; \d\.\d MB free on the file system of .*/small\); free space"):
            convert(fmnist_args(fmnist_root, small / "out", "--formats", formats,
                                "--unlabeled-factor", "0", "--max-per-class", "80", "--rho", "2"))
        assert leftovers(small) == []


def test_read_only_out_is_one_line_before_work(fmnist_root, tmp_path, monkeypatch):
    monkeypatch.setattr(sources_mod, "read_source", lambda *a, **k: pytest.fail("work started"))
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        with pytest.raises(ConvertError, match=r"--out .*/ro/sub/out: cannot create files in .*/ro/sub "
                                               r"\(Read-only file system\); make it writable or pick another --out"):
            convert(fmnist_args(fmnist_root, ro / "sub" / "out"))
        with pytest.raises(ConvertError, match=r"cannot create files in .*/ro \(Read-only file system\)"):
            write_dataset(ro / "ds", {"train": {"images": np.zeros((2, 2, 2, 1), np.uint8), "labels": [0, 1]}},
                          num_classes=2, encoding="raw")


# ---------------------------------------------------------------- every flag checked before any work


@pytest.mark.parametrize("flags,message", [
    (["--shard-size", "0"], "--shard-size 0: must be at least 1"),
    (["--workers", "-1"], "--workers -1: must be at least 1"),
    (["--workers", "0"], "--workers 0: must be at least 1"),
    (["--max-per-class", "0"], "--max-per-class 0: must be at least 1"),
    (["--rho", "0.5"], "--rho 0.5: must be a number >= 1"),
    (["--rho", "nan"], "--rho nan: must be a number >= 1"),
    (["--rho-u", "0"], "--rho-u 0.0: must be a number >= 1"),
    (["--unlabeled-factor", "-1"], "--unlabeled-factor -1.0: must be >= 0"),
    (["--max-side", "0"], "--max-side 0: must be at least 8"),
    (["--jpeg-quality", "101"], "--jpeg-quality 101: must be in 1..100"),
    (["--formats", ","], "--formats: no format given"),
    (["--formats", "ffcv,tfrecord"], r"--formats: unknown format\(s\) \['tfrecord'\]"),
    (["--num-classes", "0"], "--num-classes 0: must be at least 1"),
    (["--seed", "-2"], "--seed -2: must be >= 0"),
    (["--split-file", "/nonexistent/list.txt"], "--split-file /nonexistent/list.txt: no such file"),
    (["--unlabeled-file", "ti.pkl"], "--unlabeled-file is for --source cifar10"),
    (["--unlabeled-factor", "0", "--allow-smaller-pool"], "--allow-smaller-pool with --unlabeled-factor 0"),
])
def test_bad_flags_fail_before_any_work(fmnist_root, tmp_path, monkeypatch, flags, message):
    monkeypatch.setattr(sources_mod, "read_source", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ConvertError, match=message):
        convert(fmnist_args(fmnist_root, tmp_path / "out") + flags)
    assert leftovers(tmp_path) == []


def test_bad_flag_cli_is_one_line_without_traceback(fmnist_root, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data_prep.convert", *fmnist_args(fmnist_root, tmp_path / "o"),
                           "--workers", "-1"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --workers -1: must be at least 1 (or omitted for all cores)"]
    proc = subprocess.run([sys.executable, "-m", "data_prep.convert", "--source", "fmnist", "--root",
                           str(tmp_path / "nope"), "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --root {tmp_path / 'nope'}: no such directory; point it at the source in its original format"]


def test_write_dataset_checks_options_before_writing(tmp_path):
    x, y = class_images([3, 3])
    for kwargs, message in (({"shard_size": 0}, "--shard-size 0"), ({"workers": -1}, "--workers -1"),
                            ({"formats": ()}, "--formats: no format")):
        with pytest.raises(ConvertError, match=message):
            write_dataset(tmp_path / "ds", {"train": {"images": x, "labels": y}}, num_classes=2, encoding="raw",
                          **kwargs)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- bad images: named, all in one pass


def test_bad_images_reported_all_at_once_and_skipped_ones_recorded(tmp_path):
    rng = np.random.default_rng(0)
    good = [jpeg_bytes(natural_image(rng, 20, 24)) for _ in range(6)]
    items = []
    for k in range(30):
        items.append(good[k % 6] if k % 6 == 0 else (b"" if k % 2 else b"not an image at all"))
    labels = np.arange(30) // 6 % 2
    bad = [k for k in range(30) if k % 6]
    with pytest.raises(ConvertError) as e:
        write_dataset(tmp_path / "ds", {"train": {"images": items, "labels": labels}}, num_classes=2,
                      encoding="jpeg", max_side=32, formats=("dali",), workers=2)
    msg = str(e.value)
    assert msg.startswith(f"split 'train': {len(bad)} bad image(s): train[1] (source index 1): empty file (0 bytes); "
                          f"train[2] (source index 2): not an image (no format PIL can read); ")
    assert msg.count("(source index") == 20 and f"; and {len(bad) - 20} more; " in msg and "\n" not in msg
    assert "_io.BytesIO" not in msg and "--skip-bad" in msg and leftovers(tmp_path) == []
    out = write_dataset(tmp_path / "ds", {"train": {"images": items, "labels": labels}}, num_classes=2,
                        encoding="jpeg", max_side=32, formats=("dali",), workers=2, skip_bad=True)
    m = DatasetDir(out).manifest
    assert [s["file"] for s in m["skipped"]] == [f"train[{k}] (source index {k})" for k in bad]
    assert {s["reason"] for s in m["skipped"]} == {"empty file (0 bytes)", "not an image (no format PIL can read)"}
    assert m["splits"]["train"]["num_samples"] == 30 - len(bad)


def test_empty_and_missing_files_of_a_split_file(tmp_path):
    root, splits, _ = make_imagenet(tmp_path / "imnet", classes=2, per_class=(4, 1, 1), lt=(3, 2))
    lines = splits["train"].read_text().split("\n")
    (root / lines[1].split()[0]).write_bytes(b"")
    (root / lines[3].split()[0]).unlink()
    args = ["--source", "imagenet_lt", "--root", root, "--num-classes", 2, "--split-file", splits["train"],
            "--max-side", 32, "--unlabeled-factor", 0, "--formats", "dali", "--out", tmp_path / "out"]
    with pytest.raises(ConvertError) as e:
        convert(list(map(str, args)))
    msg = str(e.value)
    assert msg.startswith(f"split 'train': 2 bad image(s): {root / lines[1].split()[0]} (line 2 of "
                          f"{splits['train']}): empty file (0 bytes); {root / lines[3].split()[0]} (line 4 of "
                          f"{splits['train']}): missing file; restore each file or remove it from the source "
                          f"(for a split file: delete its line), or pass --skip-bad")


def test_max_per_class_reflects_images_kept_after_skip_bad(tmp_path):
    root, splits, _ = make_imagenet(tmp_path / "imnet", classes=2, per_class=(4, 1, 1), lt=(3, 2))
    lines = splits["train"].read_text().split("\n")
    for k in (0, 1):  # two of the three head-class images
        (root / lines[k].split()[0]).write_bytes(b"")
    ds = DatasetDir(convert(list(map(str, ["--source", "imagenet_lt", "--root", root, "--num-classes", 2,
                                           "--split-file", splits["train"], "--max-side", 32, "--unlabeled-factor",
                                           0, "--formats", "dali", "--skip-bad", "--out", tmp_path / "out"]))))
    assert ds.split("train").class_counts == [1, 2] and len(ds.manifest["skipped"]) == 2
    assert ds.manifest["longtail"]["max_per_class"] == 2
    assert ds.manifest["longtail"]["requested_max_per_class"] == 3


# ---------------------------------------------------------------- labels: in range and consistent


def _write_gz(path: Path, text: str) -> Path:
    with gzip.open(path, "wt") as f:
        f.write(text)
    return path


def test_label_past_the_source_class_count_stops(tmp_path):
    root, splits, _ = make_imagenet(tmp_path / "imnet", classes=2, per_class=(4, 1, 1), lt=(3, 2))
    lines = splits["train"].read_text().splitlines()
    bad = tmp_path / "train.txt"
    bad.write_text("\n".join(lines[:2] + [lines[2].rsplit(" ", 1)[0] + " 1000"] + lines[3:]) + "\n")
    with pytest.raises(ConvertError, match=rf"{bad}:3: label 1000 is out of range: imagenet_lt has 1000 classes "
                                           rf"\(0..999\); fix the line"):
        convert(list(map(str, ["--source", "imagenet_lt", "--root", root, "--split-file", bad,
                               "--unlabeled-factor", 0, "--out", tmp_path / "out"])))
    root, train, val = make_inat(tmp_path / "inat")
    with pytest.raises(ConvertError, match=rf"{val}:2: label 8142 is out of range: inat2018 has 8142 classes"):
        lines = gzip.decompress(val.read_bytes()).decode().splitlines()
        _write_gz(val, "\n".join(lines[:1] + [lines[1].rsplit(" ", 1)[0] + " 8142"] + lines[2:]) + "\n")
        convert(list(map(str, ["--source", "inat2018", "--root", root, "--split-file", train, "--val-split-file",
                               val, "--out", tmp_path / "out"])))


def test_label_must_agree_with_its_class_directory(tmp_path):
    root, splits, _ = make_imagenet(tmp_path / "imnet", classes=3, per_class=(4, 1, 1), lt=(3, 2, 2))
    test_lines = gzip.decompress(splits["test"].read_bytes()).decode().splitlines()  # one image per class
    base = ["--source", "imagenet_lt", "--root", root, "--num-classes", 3, "--split-file", splits["train"],
            "--unlabeled-factor", 0, "--out", tmp_path / "out"]
    wrong = _write_gz(tmp_path / "t1.txt.gz", "\n".join([test_lines[0], test_lines[1].rsplit(" ", 1)[0] + " 0",
                                                         test_lines[2]]) + "\n")
    with pytest.raises(ConvertError, match=rf"{wrong}:2: val/n01440765/\S+ has label 0, but {splits['train']}:4 "
                                           rf"gives class 'n01440765' label 1; every image of a class must carry"):
        convert(list(map(str, base + ["--test-split-file", wrong])))
    new_dir = _write_gz(tmp_path / "t3.txt.gz", "\n".join(test_lines[:2] + [
        test_lines[2].replace("n01440766", "n09999999")]) + "\n")
    with pytest.raises(ConvertError, match=rf"{new_dir}:3: label 2 is given to class 'n09999999', but "
                                           rf"{splits['train']}:6 gives it to 'n01440766'; one label per class"):
        convert(list(map(str, base + ["--test-split-file", new_dir])))
    moved = _write_gz(tmp_path / "t2.txt.gz", "\n".join(test_lines[:2] + [test_lines[2].rsplit(" ", 1)[0]
                                                                          .replace("n01440766", "n01440764") + " 2"]))
    with pytest.raises(ConvertError, match=rf"{moved}:3: .* has label 2, but {splits['train']}:1 gives class "
                                           rf"'n01440764' label 0; every image of a class must carry"):
        convert(list(map(str, base + ["--test-split-file", moved])))


def test_real_split_files_are_consistent_and_a_bad_line_is_found(tmp_path):
    if not SPLITS.is_dir():
        pytest.skip("no shared split files")
    src = sources_mod.read_split_source("imagenet_lt", tmp_path, SPLITS / "ImageNet_LT_val.txt.gz", None,
                                        SPLITS / "ImageNet_LT_test.txt.gz", None, with_pool=False)
    assert src.num_classes == 1000 and len(src.train) == 20000 and len(src.test) == 50000
    assert src.class_names[0] == "n01440764"
    inat = sources_mod.read_split_source("inat2018", tmp_path, SPLITS / "iNaturalist18_val.txt.gz", None, None,
                                         None, with_pool=False)
    assert inat.num_classes == 8142 and inat.class_names[7291] == "Plantae/7291"
    lines = gzip.decompress((SPLITS / "ImageNet_LT_val.txt.gz").read_bytes()).decode().splitlines()
    lines[6] = lines[6].rsplit(" ", 1)[0] + " 1000"
    bad = _write_gz(tmp_path / "val.txt.gz", "\n".join(lines) + "\n")
    with pytest.raises(ConvertError, match=rf"{bad}:7: label 1000 is out of range: imagenet_lt has 1000 classes"):
        sources_mod.read_split_source("imagenet_lt", tmp_path, bad, None, None, None, with_pool=False)


def test_blank_lines_keep_source_index_equal_to_the_line(tmp_path):
    root, train, _ = make_inat(tmp_path / "inat")
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines[:3] + ["", "  "] + lines[3:]) + "\n")
    ds = DatasetDir(convert(list(map(str, ["--source", "inat2018", "--root", root, "--num-classes", 4,
                                           "--split-file", train, "--formats", "dali", "--out", tmp_path / "out"]))))
    expected = list(range(3)) + list(range(5, len(lines) + 2))
    assert sorted(ds.split("train").source_index.tolist()) == expected
    text = train.read_text().split("\n")
    for pos, index in enumerate(ds.split("train").source_index):  # the label of position pos is on line index
        assert int(text[index].rsplit(" ", 1)[1]) == ds.split("train").labels[pos]


# ---------------------------------------------------------------- byte-reproducible outputs


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def test_identical_conversions_are_byte_identical_whatever_the_worker_count(tmp_path, fmnist_root):
    assert len(os.sched_getaffinity(0)) >= 2 or pytest.skip("needs 2 cores for parallel workers")
    x, y = class_images([1500, 1000, 500], (8, 8, 3))
    raw = [write_dataset(tmp_path / f"raw{k}", {"train": {"images": x, "labels": y}}, num_classes=3,
                         encoding="raw", formats=("ffcv",), workers=workers)
           for k, workers in enumerate((None, 1))]  # None: every core
    make_folder(tmp_path / "f", per_class=(80, 70, 60), test_per_class=3)
    args = ["--source", "folder", "--root", tmp_path / "f", "--profile", "none", "--unlabeled-factor", 0,
            "--max-side", 16]
    jpeg = [convert(list(map(str, args + ["--out", tmp_path / f"jpeg{k}", *workers])))
            for k, workers in enumerate(([], ["--workers", "1"]))]
    for a, b in (raw, jpeg):
        ma, mb = (json.loads((r / "manifest.json").read_text()) for r in (a, b))
        assert ma["checksums"] == mb["checksums"] and _files(a) == _files(b)
        assert ma["splits"]["train"]["num_samples"] > 150  # several FFCV chunks / worker jobs
