"""Convert a source dataset into a long-tailed fasttrain dataset directory (format: DESIGN.md).

    python -m data_prep.convert --source fmnist --root /usr/share/datasets/fashion-mnist --profile exp \
        --rho 100 --max-per-class 1000 --rho-u 100 --unlabeled-factor 5 --seed 0 --formats ffcv,dali --out OUT

API: `write_dataset(out, splits, ...)` writes prepared splits; `convert(args)` builds them from a source.
"""
from __future__ import annotations

import argparse
import errno
import glob
import hashlib
import json
import math
import numbers
import os
import shlex
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import numpy as np

from data_prep import ConvertError
from data_prep.writers import (DEFAULT_MAX_SIDE, MIN_SHORT_SIDE, RawStore, dali_bytes, default_workers, prepare_jpegs,
                               write_dali, write_ffcv)

FORMAT_VERSION = 1
FORMATS = ("ffcv", "dali")
STATS_SAMPLE = 1000  # decoded train images used for mean/std of jpeg sets
FFCV_PAGE = 1 << 21  # ffcv.writer.MIN_PAGE_SIZE (a .beton wastes at most about a page)
SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
ACCESS_ERRORS = (errno.EROFS, errno.EACCES, errno.EPERM)


# ---------------------------------------------------------------- output directory (temp name + rename)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Remove temp dirs of conversions to `out` that were killed (their process is gone)."""
    for p in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, pid = p.name[len(out.name) + 2:].rpartition("-")
        if kind in ("tmp", "old") and pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse to replace a finished dataset (or a non-empty foreign directory) unless `overwrite`."""
    if overwrite or not out.exists():
        return
    if (out / "manifest.json").exists():
        raise ConvertError(f"{out} already holds a converted dataset (manifest.json); pass --overwrite "
                           f"(overwrite=True) to replace it, or pick another --out")
    if not out.is_dir() or any(out.iterdir()):
        raise ConvertError(f"{out} exists and is not an empty directory; pass --overwrite to replace it, "
                           f"or pick another --out")


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def check_out_writable(out: Path) -> None:
    """--out's parent exists (or is created) and accepts files; else a ConvertError naming the fix."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        why = e.strerror or type(e).__name__
        fix = "free space on it" if e.errno in SPACE_ERRORS else "make it writable"
        raise ConvertError(f"--out {out}: cannot create files in {out.parent} ({why}); {fix} or pick "
                           f"another --out") from None


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _require_space(where: Path, need: int, what: str) -> None:
    free = _free_bytes(where)
    if need > free:
        raise ConvertError(f"{what}: needs about {_mb(need)} but only {_mb(free)} is free on the file system "
                           f"of {where}; free space or pick another --out")


def _split_bytes(store, formats, shard_size: int) -> int:
    """Bytes the formats of one split take on disk (an estimate, a little high)."""
    n = len(store)
    need = 16 * n + 1024  # meta arrays
    if "ffcv" in formats:
        need += store.nbytes + 40 * n + 2 * FFCV_PAGE + 4096
    if "dali" in formats:
        need += dali_bytes(store, shard_size)
    return need


def _publish(tmp: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists() or out.is_symlink():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _checksums(root: Path, workers: int) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    with ThreadPoolExecutor(workers) as ex:
        digests = list(ex.map(_sha256, files))
    return {p.relative_to(root).as_posix(): d for p, d in zip(files, digests)}


def _versions() -> dict[str, str]:
    import fasttrain

    def version(*names):
        for name in names:
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
        return None

    return {"fasttrain": fasttrain.__version__, "ffcv": version("ffcv"),
            "nvidia-dali": version("nvidia-dali", "nvidia-dali-cuda120", "nvidia-dali-cuda110",
                                   "nvidia-dali-cuda130"),
            "numpy": np.__version__}


# ---------------------------------------------------------------- statistics


def _mean_std(store, sample: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std (0-255): over all images of a raw store, over `sample` evenly spaced decoded
    images of a jpeg store."""
    if store.encoding == "raw":
        chunks = (store.images[i:i + 4096] for i in range(0, len(store), 4096))
    else:
        picks = np.unique(np.linspace(0, len(store) - 1, min(sample, len(store))).astype(np.int64))
        chunks = (store.image(int(i)) for i in picks)
    s = s2 = count = 0
    for x in chunks:
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        s, s2, count = s + x.sum(0), s2 + (x * x).sum(0), count + len(x)
    mean = s / count
    std = np.sqrt(np.maximum(s2 / count - mean ** 2, 0))
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


# ---------------------------------------------------------------- write_dataset


def _check_labels(name: str, labels: np.ndarray, num_classes: int, labeled: bool) -> None:
    low = 0 if labeled else -1
    bad = np.flatnonzero((labels < low) | (labels >= num_classes))
    if len(bad):
        raise ConvertError(f"split {name!r}: label {labels[bad[0]]} at position {bad[0]} is out of range "
                           f"[0, {num_classes}); fix the labels or set num_classes (--num-classes)")


def check_write_options(*, formats, shard_size: int, max_side: int, jpeg_quality: int, workers) -> None:
    """The writer options, checked before any work (one ConvertError naming the flag)."""
    if not formats:
        raise ConvertError(f"--formats: no format given; use a non-empty subset of {','.join(FORMATS)}")
    if unknown := set(formats) - set(FORMATS):
        raise ConvertError(f"--formats: unknown format(s) {sorted(unknown)}; use a subset of {','.join(FORMATS)}")
    if not (isinstance(shard_size, numbers.Integral) and shard_size >= 1):
        raise ConvertError(f"--shard-size {shard_size}: must be at least 1 (samples per DALI tar shard)")
    if not (isinstance(max_side, numbers.Integral) and max_side >= 8):
        raise ConvertError(f"--max-side {max_side}: must be at least 8 (pixels of the longer image side)")
    if not (isinstance(jpeg_quality, numbers.Integral) and 1 <= jpeg_quality <= 100):
        raise ConvertError(f"--jpeg-quality {jpeg_quality}: must be in 1..100")
    default_workers(workers)


def write_dataset(out, splits: dict[str, dict], *, num_classes: int, encoding: str,
                  formats=FORMATS, shard_size: int = 1000, max_side: int = DEFAULT_MAX_SIDE, jpeg_quality: int = 90,
                  normalization: dict | None = None, class_names=None, extra_manifest: dict | None = None,
                  workers: int | None = None, overwrite: bool = False, skip_bad: bool = False) -> Path:
    """Write a dataset directory (DESIGN.md) from prepared splits; returns `out`.

    JPEG sets: images are stored by `data_prep.writers.stored_size` (`max_side`: cap on the longer side).
    `normalization`: {"name", "mean", "std"}, fixed per-channel constants on the 0-1 scale (as
    transforms.Normalize takes them) that the loaders normalise with, recorded under `name` (convert: the
    paper's, "paper"); None: the train split's mean / std ("train_split").

    splits[name] = {"images": N x H x W x C uint8 (raw) | list of encoded bytes / file paths / N x H x W x 3
    array (jpeg), "labels": int array (the true labels for "unlabeled": written to
    unlabeled.true_labels.npy, -1 in the files), "source_index": int array (default arange),
    optional "requested_class_counts" (-> manifest shortfall), optional "names" (per item, for errors)}.
    Everything is written to a temp dir next to `out`, the manifest last, then renamed into place. Any
    failure removes the temp dir; a full disk or unwritable --out is a ConvertError naming the file.
    """
    out = Path(out).absolute()
    formats = tuple(formats)
    if encoding not in ("raw", "jpeg"):
        raise ConvertError(f"encoding {encoding!r} must be 'raw' or 'jpeg'")
    check_write_options(formats=formats, shard_size=shard_size, max_side=max_side, jpeg_quality=jpeg_quality,
                        workers=workers)
    if "train" not in splits:
        raise ConvertError(f"no 'train' split given (got {sorted(splits)})")
    _check_normalization(normalization, np.shape(splits["train"]["images"])[-1] if encoding == "raw" else 3)
    workers = default_workers(workers)
    check_out(out, overwrite)
    check_out_writable(out)
    _clean_stale(out)
    if encoding == "raw":  # the whole size is known: refuse before writing anything
        need = sum(_split_bytes(RawStore(np.asarray(spec["images"])), formats, shard_size) for spec in splits.values())
        _require_space(out.parent, need, f"--out {out}")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    writing = {"file": tmp, "need": None, "out": out}  # what is being written now (for error messages)
    try:
        manifest = _write_splits(tmp, splits, num_classes=num_classes, encoding=encoding, formats=formats,
                                 shard_size=shard_size, max_side=max_side, jpeg_quality=jpeg_quality,
                                 normalization=normalization, workers=workers, skip_bad=skip_bad, writing=writing)
        extra = dict(extra_manifest or {})
        manifest["skipped"] = list(extra.pop("skipped", [])) + manifest["skipped"]
        if manifest["skipped"] and isinstance(extra.get("longtail"), dict):
            longtail = dict(extra["longtail"])  # n_max as kept, after skipped images
            kept_max = max(manifest["splits"]["train"]["class_counts"])
            if kept_max != longtail.get("max_per_class"):
                longtail["requested_max_per_class"] = longtail.get("max_per_class")
                longtail["max_per_class"] = kept_max
            extra["longtail"] = longtail
        writing["file"] = tmp / "manifest.json"
        manifest = {"format_version": FORMAT_VERSION, "num_classes": int(num_classes),
                    "class_names": [str(c) for c in class_names] if class_names is not None
                    else [str(i) for i in range(num_classes)],
                    **extra, **manifest,
                    "checksums": _checksums(tmp, workers), "versions": _versions(),
                    "command": extra.get("command", " ".join(map(shlex.quote, [sys.executable] + sys.argv))),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "manifest.json.part").write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp / "manifest.json.part", tmp / "manifest.json")
        _publish(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(e, out, tmp, writing) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_error(e: OSError, out: Path, tmp: Path, writing: dict) -> ConvertError:
    """One line for a failed write: which file, and for a full disk how much space is needed / free."""
    name = Path(writing["file"])
    rel = name.relative_to(tmp).as_posix() if name.is_relative_to(tmp) and name != tmp else ""
    where = f"{out}/{rel}" if rel else str(out)
    if e.errno in ACCESS_ERRORS:
        return ConvertError(f"cannot write {where} ({e.strerror}); make {out.parent} writable or pick "
                            f"another --out (the partial output was removed)")
    if e.errno not in SPACE_ERRORS:
        return ConvertError(f"writing {where} failed ({type(e).__name__}: {e}); check the disk of {out.parent} "
                            f"and convert again (the partial output was removed)")
    free = _free_bytes(out.parent)
    need = f"split {writing['split']!r} needs about {_mb(writing['need'])}; " if writing.get("need") else ""
    return ConvertError(f"no space left on the device writing {where} ({need}{_mb(free)} free on the file "
                        f"system of {out.parent}); free space or pick another --out (the partial output was "
                        f"removed)")


def _write_splits(tmp: Path, splits, *, num_classes, encoding, formats, shard_size, max_side,
                  jpeg_quality, normalization, workers, skip_bad, writing) -> dict:
    entries, skipped, image_info, largest_side = {}, [], None, 0
    for name, spec in splits.items():
        labels = np.asarray(spec["labels"], dtype=np.int64)
        n = len(labels)
        index = np.asarray(spec.get("source_index", np.arange(n)), dtype=np.int64)
        if len(spec["images"]) != n or len(index) != n:
            raise ConvertError(f"split {name!r}: {len(spec['images'])} images, {n} labels and {len(index)} "
                               f"source indices; they must have the same length")
        _check_labels(name, labels, num_classes, name != "unlabeled")
        if encoding == "raw":
            images = np.asarray(spec["images"])
            if images.dtype != np.uint8 or images.ndim != 4:
                raise ConvertError(f"split {name!r}: raw images must be a uint8 N x H x W x C array, "
                                   f"got {images.dtype} {images.shape}")
    for name, spec in splits.items():
        labeled = name != "unlabeled"
        labels = np.asarray(spec["labels"], dtype=np.int64)
        index = np.asarray(spec.get("source_index", np.arange(len(labels))), dtype=np.int64)
        images = spec["images"]
        if encoding == "raw":
            store = RawStore(np.asarray(images))
        else:
            names = spec.get("names") or [str(x) if isinstance(x, (str, Path)) else f"{name}[{i}] (source "
                                          f"index {index[i]})" for i, x in enumerate(images)]
            writing.update(file=tmp / f".{name}.jpegs", need=None)
            store, kept, bad = prepare_jpegs(images, tmp / f".{name}.jpegs", max_side=max_side,
                                             quality=jpeg_quality, workers=workers, names=names,
                                             skip_bad=skip_bad, desc=name)
            labels, index, skipped = labels[kept], index[kept], skipped + bad
            largest_side = max(largest_side, int(store.shapes.max(initial=0)))
            _require_space(tmp, _split_bytes(store, formats, shard_size), f"--out {writing['out']}, split {name!r}")
        writing.update(need=_split_bytes(store, formats, shard_size), split=name)
        counts = np.bincount(labels[labels >= 0], minlength=num_classes)
        if name == "train" and (empty := np.flatnonzero(counts == 0)).size:
            raise ConvertError(f"split 'train': class {int(empty[0])} has no images ({len(empty)} empty "
                               f"classes); check the source / split file, --num-classes, or raise "
                               f"--max-per-class / lower --rho")
        file_labels = labels if labeled else np.full_like(labels, -1)
        entry = {"num_samples": int(len(labels)), "class_counts": counts.tolist(), "labeled": labeled}
        if encoding == "jpeg":
            entry["stored"] = dict(store.stored)
        if "requested_class_counts" in spec:
            requested = np.asarray(spec["requested_class_counts"], dtype=np.int64)
            entry["requested_class_counts"] = requested.tolist()
            entry["shortfall"] = np.maximum(requested - counts, 0).tolist()
        if "ffcv" in formats:
            writing["file"] = tmp / f"{name}.beton"
            write_ffcv(tmp / f"{name}.beton", store, file_labels, index, max_side=max_side,
                       jpeg_quality=jpeg_quality)
            entry["ffcv"] = f"{name}.beton"
        if "dali" in formats:
            writing["file"] = tmp / "dali" / name
            write_dali(tmp / "dali" / name, store, file_labels, index, shard_size=shard_size, desc=name)
            entry["dali"] = f"dali/{name}"
        writing["file"] = tmp / f"{name}.meta.npz"
        np.savez(tmp / f"{name}.meta.npz", labels=file_labels, source_index=index)
        entry["meta"] = f"{name}.meta.npz"
        if not labeled:
            writing["file"] = tmp / f"{name}.true_labels.npy"
            np.save(tmp / f"{name}.true_labels.npy", labels)
            entry["true_labels"] = f"{name}.true_labels.npy"
        if name == "train":
            shape = store.images.shape[1:] if encoding == "raw" else (None, None, 3)
            image_info = {"encoding": encoding, "height": shape[0], "width": shape[1], "channels": shape[2],
                          "max_side": max_side if encoding == "jpeg" else None,
                          "min_short_side": MIN_SHORT_SIDE if encoding == "jpeg" else None,
                          "jpeg_quality": jpeg_quality if encoding == "jpeg" else None,
                          **_normalization(store, normalization)}
        if encoding == "jpeg":
            (tmp / f".{name}.jpegs").unlink()
        entries[name] = entry
    if encoding == "jpeg":
        image_info["largest_side"] = largest_side  # every stored image fits in largest_side x largest_side
    return {"image": image_info, "splits": entries, "skipped": skipped}


def _normalization(store, constants: dict | None) -> dict:
    """The manifest's mean / std (0-255 scale) and where they come from (see write_dataset)."""
    if constants is None:
        mean, std = _mean_std(store, STATS_SAMPLE)
        return {"mean": mean, "std": std, "normalization": "train_split"}
    mean, std = ([round(float(v) * 255, 4) for v in constants[key]] for key in ("mean", "std"))
    return {"mean": mean, "std": std, "normalization": str(constants["name"])}


def _check_normalization(constants: dict | None, channels: int) -> None:
    if constants is None:
        return
    mean, std = constants.get("mean", ()), constants.get("std", ())
    if not (len(mean) == len(std) == channels and all(v > 0 for v in std) and "name" in constants):
        raise ConvertError(f"normalization {constants}: needs a name, {channels} means and {channels} positive "
                           f"stds (0-1 scale)")


# ---------------------------------------------------------------- source -> splits


def _by_label(rank_counts: list[int], order: list[int]) -> list[int]:
    """Counts listed head to tail (rank) -> counts per label, class order[r] getting rank_counts[r]."""
    counts = [0] * len(order)
    for rank, label in enumerate(order):
        counts[label] = rank_counts[rank]
    return counts


def _pool_shortfall_error(pool_name: str, requested, have, args_text: str, fix: str) -> ConvertError:
    requested, have = np.asarray(requested), np.asarray(have)
    short = np.flatnonzero(have < requested)
    shown = ", ".join(f"class {c} needs {requested[c]}, has {have[c]}" for c in short[:5])
    more = f" and {len(short) - 5} more classes" if len(short) > 5 else ""
    return ConvertError(f"the unlabeled pool ({pool_name}) cannot supply what {args_text} asks for: needs "
                        f"{int(requested.sum())} images, has {int(np.minimum(have, requested).sum())} of them "
                        f"({shown}{more}); {fix}, or pass --allow-smaller-pool to accept a smaller pool "
                        f"(recorded in manifest.json)")


def build_splits(src, *, profile: str | None, rho: float, max_per_class: int | None, rho_u: float,
                 unlabeled_factor: float | None, seed: int, allow_smaller_pool: bool = False,
                 val_per_class: int = 0) -> tuple[dict, dict]:
    """The long-tailed train split, the unlabeled pool and the eval splits of `src`; plus manifest info.

    Class sizes follow `src.class_order` (head first: SVHN's is 1..9, 0 as in the paper). The pool has
    `unlabeled_factor` x the labeled size with profile rho_u; a pool that cannot supply that is a
    ConvertError unless `allow_smaller_pool`. `unlabeled_factor=None`: default_unlabeled_factor.
    `val_per_class` > 0 (sources without a val split): a balanced val split of that many images per class,
    drawn from the train images not in the labeled set (and kept out of the pool), for model selection."""
    from data_prep.longtail import class_counts, select, unlabeled_counts

    c, train = src.num_classes, src.train
    order = list(src.class_order) if src.class_order is not None else list(range(c))
    for name, part in (("train", train), ("test", src.test), ("val", src.val)):
        if part is not None:
            _check_labels(f"{src.name} {name}", part.labels, c, labeled=True)
    have = np.bincount(train.labels, minlength=c)
    if (empty := np.flatnonzero(have == 0)).size:
        raise ConvertError(f"{src.name}: class {int(empty[0])} ({src.class_names[empty[0]]}) has no training "
                           f"images in {src.root}; add images, fix the split file or set --num-classes")
    if src.longtail_given:
        if profile not in (None, "none") or max_per_class is not None:
            flag = f"--profile {profile}" if profile not in (None, "none") else "--max-per-class"
            raise ConvertError(f"{flag}: the {src.name} train set is already long-tailed (given by --split-file); "
                               f"drop {flag.split()[0]}")
        profile, n_max, rows = "split-file", int(have.max()), np.arange(len(train))
    else:
        profile = profile or "exp"
        available = int(have.min())
        if max_per_class is not None and max_per_class > available and profile == "none":
            raise ConvertError(f"--max-per-class {max_per_class} but the smallest class has {available} images")
        n_max = max_per_class or src.default_n_max or available
        counts = _by_label(class_counts(c, n_max, profile, rho), order)
        if 0 in counts:
            raise ConvertError(f"--profile {profile} with n_max {n_max} and --rho {_number(rho)} leaves class "
                               f"{counts.index(0)} with 0 images; raise --max-per-class or lower --rho")
        rows = select(train.labels, counts, seed)
    train_index = train.index[rows]
    splits = {"train": dict(zip(("images", "labels"), train.take(rows)), source_index=train_index,
                            names=train.names(rows))}
    vrows = np.zeros(0, np.int64)
    if val_per_class > 0:
        if src.val is not None or src.longtail_given:
            raise ConvertError(f"--val-per-class: {src.name} has its own val split; drop --val-per-class")
        free = np.setdiff1d(np.arange(len(train)), rows)
        free_have = np.bincount(train.labels[free], minlength=c)[:c]
        if np.any(free_have < val_per_class):
            short = int(np.argmin(free_have))
            raise ConvertError(f"--val-per-class {val_per_class}: class {short} has only {int(free_have[short])} "
                               f"train images besides the labeled set; lower --val-per-class")
        vrows = select(train.labels, [val_per_class] * c, [seed, 2], candidates=free)
        splits["val"] = dict(zip(("images", "labels"), train.take(vrows)), source_index=train.index[vrows],
                             names=train.names(vrows))
    if unlabeled_factor is None:
        unlabeled_factor = default_unlabeled_factor(src.name, src.pool is not None)
    info = {"longtail": {"profile": profile, "rho": None if profile == "split-file" else _number(rho),
                         "max_per_class": n_max, "rho_u": _number(rho_u),
                         "unlabeled_factor": _number(unlabeled_factor), "seed": seed}}
    if val_per_class > 0:
        info["longtail"]["val_per_class"] = int(val_per_class)
    if unlabeled_factor > 0:
        total = int(round(unlabeled_factor * len(rows)))
        requested = _by_label(unlabeled_counts(c, total, rho_u), order)
        ask = f"--unlabeled-factor {_number(unlabeled_factor)} --rho-u {_number(rho_u)}"
        if src.pool is not None:
            pool, offset, candidates, pool_name = src.pool, train.index_end, None, src.pool_name
            fix = "lower --unlabeled-factor"
        elif not src.longtail_given:
            pool, offset, pool_name = train, 0, "train_not_selected"
            candidates = np.setdiff1d(np.arange(len(train)), np.union1d(rows, vrows))
            fix = ("pass --unlabeled-file with the TinyImages pool (ti_80M_selected.pickle, the paper's pool), "
                   "lower --unlabeled-factor" if src.name == "cifar10" else "lower --unlabeled-factor")
        else:
            raise ConvertError(f"--unlabeled-factor {_number(unlabeled_factor)}: {src.name} has no unlabeled "
                               f"pool; pass --unlabeled-factor 0")
        pool_labels = pool.labels if candidates is None else pool.labels[candidates]
        pool_have = np.bincount(pool_labels[pool_labels >= 0], minlength=c)[:c]
        if np.any(pool_have < requested) and not allow_smaller_pool:
            raise _pool_shortfall_error(pool_name, requested, pool_have, ask, fix)
        picked = select(pool.labels, requested, [seed, 1], candidates=candidates, allow_shortfall=True)
        if len(picked):
            images, labels = pool.take(picked)
            splits["unlabeled"] = {"images": images, "labels": labels, "source_index": pool.index[picked] + offset,
                                   "requested_class_counts": requested, "names": pool.names(picked)}
        info["unlabeled_pool"] = {"name": pool_name, "size": len(pool) if candidates is None else len(candidates),
                                  "source_index_offset": offset, "requested": int(sum(requested)),
                                  "selected": int(len(picked)), "allow_smaller_pool": bool(allow_smaller_pool)}
    for name in ("test", "val"):
        part = getattr(src, name)
        if part is not None:
            splits[name] = {"images": part.images, "labels": part.labels, "source_index": part.index,
                            "names": part.names(np.arange(len(part)))}
    for spec in splits.values():
        if spec.get("names") is None:
            spec.pop("names", None)
    return splits, info


PAPER_POOL_FACTOR = 5  # the paper's unlabeled pool: 5 x the labeled set (train_semi.py, unlabel_size_factor)


def default_unlabeled_factor(source: str, pool_given: bool) -> int:
    """Pool size / labeled size when --unlabeled-factor is not given: the paper's 5 where the paper has a pool
    (CIFAR-10 with the TinyImages file, SVHN with its `extra` split), else 0 (no pool). Pools the paper does
    not use (the rest of ImageNet, leftover train images) are only drawn when asked for."""
    return PAPER_POOL_FACTOR if source == "svhn" or (source == "cifar10" and pool_given) else 0


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


EPILOG = """examples (also as `fasttrain-convert ...`):
  python -m data_prep.convert --source fmnist --root /usr/share/datasets/fashion-mnist --rho 100 \\
      --max-per-class 1000 --unlabeled-factor 5 --rho-u 100 --out data/fmnist_lt
  python -m data_prep.convert --source cifar10 --root cifar-10-batches-py --rho 100 \\
      --unlabeled-file ti_80M_selected.pickle --rho-u 1 --out data/cifar10_lt_r100
  python -m data_prep.convert --source imagenet_lt --root /datasets/imagenet --split-file ImageNet_LT_train.txt \\
      --val-split-file ImageNet_LT_val.txt --test-split-file ImageNet_LT_test.txt --out data/imagenet_lt

stored image size (jpeg sets): an image is stored as it is (a JPEG: its original bytes) unless its longer side
exceeds --max-side; then it is scaled down to --max-side on the longer side, but an image whose shorter side
is at least 256 keeps at least 256 of it. The default 800 keeps the pixels the paper's transforms use
(RandomResizedCrop(224); Resize(256) + CenterCrop(224)): iNaturalist 2018 images are at most 800 px and
typical ImageNet images about 500 px. A smaller --max-side decodes faster but is a departure from the paper
(README, "Stored image size"): --max-side 256 stores most images at a shorter side of 256.

normalisation: the paper's fixed constants for cifar10/cifar100, svhn, imagenet_lt and inat2018 (recorded in
manifest.json as "normalization": "paper"); the train split's mean / std for fmnist and folder."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the examples kept as written."""


def parse_args(argv=None) -> argparse.Namespace:
    from data_prep.longtail import PROFILES
    from data_prep.sources import SOURCES
    p = argparse.ArgumentParser(prog="python -m data_prep.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter, epilog=EPILOG)
    p.add_argument("--source", required=True, help=f"one of {', '.join(SOURCES)}")
    p.add_argument("--root", required=True, type=Path, help="source directory in its original on-disk format")
    p.add_argument("--out", required=True, type=Path, help="output dataset directory")
    p.add_argument("--profile", choices=PROFILES, default=None,
                   help="long-tail profile for balanced sources (default exp; not for split-file sources)")
    p.add_argument("--rho", type=float, default=100, help="imbalance ratio n_max / n_min")
    p.add_argument("--max-per-class", type=int, default=None,
                   help="n_max (default: svhn 1000 as in the paper; else the smallest class count of the source "
                        "train split)")
    p.add_argument("--rho-u", type=float, default=None, help="imbalance ratio of the unlabeled pool (default: --rho)")
    p.add_argument("--unlabeled-factor", type=float, default=None,
                   help="pool size / labeled train size (0: no pool). Default: the paper's 5 where the paper has "
                        "a pool (cifar10 with --unlabeled-file, svhn: its extra split); else 0. Other pools "
                        "(imagenet_lt: ImageNet train images not in the split; fmnist / cifar100 / folder: train "
                        "images not selected) only when asked for")
    p.add_argument("--allow-smaller-pool", action="store_true",
                   help="accept an unlabeled pool smaller than --unlabeled-factor asks for (recorded in the manifest)")
    p.add_argument("--unlabeled-file", type=Path, default=None, help="cifar10: TinyImages pool pickle")
    p.add_argument("--split-file", type=Path, default=None, help="imagenet_lt/inat2018/folder: train list")
    p.add_argument("--val-split-file", type=Path, default=None)
    p.add_argument("--test-split-file", type=Path, default=None)
    p.add_argument("--num-classes", type=int, default=None,
                   help="split-file sources (default: imagenet_lt 1000, inat2018 8142, folder max label + 1)")
    p.add_argument("--val-per-class", type=int, default=0,
                   help="sources without a val split: carve a balanced val split of this many train images per "
                        "class (neither labeled nor in the pool) for choosing epochs and hyper-parameters")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--formats", default="ffcv,dali", help="comma-separated subset of ffcv,dali")
    p.add_argument("--shard-size", type=int, default=1000, help="DALI samples per tar shard")
    p.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                   help="jpeg sets: cap on the longer side of a stored image (see 'stored image size' below)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed in the manifest)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    args = p.parse_args(argv)
    if args.rho_u is None:
        args.rho_u = args.rho
    return args


def check_args(args) -> list[str]:
    """Every flag checked before any work starts: a ConvertError naming the flag and the fix. Returns the
    formats."""
    from data_prep.sources import SOURCES
    if args.source not in SOURCES:
        raise ConvertError(f"unknown source {args.source!r}; use one of {', '.join(SOURCES)}")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    check_write_options(formats=formats, shard_size=args.shard_size, max_side=args.max_side,
                        jpeg_quality=args.jpeg_quality, workers=args.workers)
    for flag, value in (("--rho", args.rho), ("--rho-u", args.rho_u)):
        if not (math.isfinite(value) and value >= 1):
            raise ConvertError(f"{flag} {value}: must be a number >= 1 (the ratio largest / smallest class)")
    if args.max_per_class is not None and args.max_per_class < 1:
        raise ConvertError(f"--max-per-class {args.max_per_class}: must be at least 1 (omit it for the default)")
    if args.unlabeled_factor is not None and not (math.isfinite(args.unlabeled_factor) and args.unlabeled_factor >= 0):
        raise ConvertError(f"--unlabeled-factor {args.unlabeled_factor}: must be >= 0 (0: no unlabeled pool)")
    if args.num_classes is not None and args.num_classes < 1:
        raise ConvertError(f"--num-classes {args.num_classes}: must be at least 1")
    if args.val_per_class < 0:
        raise ConvertError(f"--val-per-class {args.val_per_class}: must be >= 0 (0: no val split)")
    if args.seed < 0:
        raise ConvertError(f"--seed {args.seed}: must be >= 0")
    if args.unlabeled_file is not None and args.source != "cifar10":
        raise ConvertError(f"--unlabeled-file is for --source cifar10 (TinyImages); {args.source} takes its "
                           f"pool from its own data")
    default = ""
    if args.unlabeled_factor is None:
        args.unlabeled_factor = default_unlabeled_factor(args.source, args.unlabeled_file is not None)
        default = f" (the default for {args.source}{' without --unlabeled-file' if args.source == 'cifar10' else ''})"
    if args.unlabeled_factor == 0 and args.allow_smaller_pool:
        raise ConvertError(f"--allow-smaller-pool with --unlabeled-factor 0{default}: there is no pool; drop "
                           f"--allow-smaller-pool or ask for a pool with --unlabeled-factor")
    if not Path(args.root).exists():
        raise ConvertError(f"--root {args.root}: no such directory; point it at the source in its original format")
    for flag, path in (("--split-file", args.split_file), ("--val-split-file", args.val_split_file),
                       ("--test-split-file", args.test_split_file), ("--unlabeled-file", args.unlabeled_file)):
        if path is not None and not Path(path).is_file():
            raise ConvertError(f"{flag} {path}: no such file")
    return formats


def convert(args, command: str | None = None) -> Path:
    """Source -> dataset directory. `args`: a parsed Namespace or a list of CLI arguments."""
    from data_prep.sources import PAPER_NORMALIZATION, read_source
    if not isinstance(args, argparse.Namespace):
        command = command or " ".join(["python -m data_prep.convert", *map(shlex.quote, map(str, args))])
        args = parse_args([str(a) for a in args])
    formats = check_args(args)
    out = args.out.absolute()
    check_out(out, args.overwrite)
    check_out_writable(out)
    src = read_source(args.source, args.root, unlabeled_file=args.unlabeled_file,
                      with_pool=args.unlabeled_factor != 0, split_file=args.split_file,
                      val_split_file=args.val_split_file, test_split_file=args.test_split_file,
                      num_classes=args.num_classes)
    splits, info = build_splits(src, profile=args.profile, rho=args.rho, max_per_class=args.max_per_class,
                                rho_u=args.rho_u, unlabeled_factor=args.unlabeled_factor, seed=args.seed,
                                allow_smaller_pool=args.allow_smaller_pool, val_per_class=args.val_per_class)
    extra = {"source": src.name, "source_root": str(Path(args.root).absolute()), "source_files": src.files,
             **info, "command": command or " ".join(map(shlex.quote, [sys.executable] + sys.argv))}
    return write_dataset(args.out, splits, num_classes=src.num_classes, encoding=src.encoding, formats=formats,
                         shard_size=args.shard_size, max_side=args.max_side, jpeg_quality=args.jpeg_quality,
                         normalization=PAPER_NORMALIZATION.get(src.name), class_names=src.class_names,
                         extra_manifest=extra, workers=args.workers,
                         overwrite=args.overwrite, skip_bad=args.skip_bad)


def main(argv=None) -> int:
    try:
        out = convert(sys.argv[1:] if argv is None else argv)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the partial output was removed", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
