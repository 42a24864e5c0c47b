"""Convert a source dataset into a long-tailed fasttrain dataset directory (format: DESIGN.md).

    python -m data_prep.convert --source fmnist --root /usr/share/datasets/fashion-mnist --profile exp \
        --rho 100 --max-per-class 1000 --rho-u 100 --unlabeled-factor 5 --seed 0 --formats ffcv,dali --out OUT

API: `write_dataset(out, splits, ...)` writes prepared splits; `convert(args)` builds them from a source.
"""
from __future__ import annotations

import argparse
import hashlib
import json
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
from data_prep.writers import RawStore, default_workers, prepare_jpegs, write_dali, write_ffcv

FORMAT_VERSION = 1
FORMATS = ("ffcv", "dali")
STATS_SAMPLE = 1000  # decoded train images used for mean/std of jpeg sets


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
    for p in out.parent.glob(f".{out.name}.*-*"):
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


def write_dataset(out, splits: dict[str, dict], *, num_classes: int, encoding: str,
                  formats=FORMATS, shard_size: int = 1000, max_side: int = 256, jpeg_quality: int = 90,
                  class_names=None, extra_manifest: dict | None = None, workers: int | None = None,
                  overwrite: bool = False, skip_bad: bool = False) -> Path:
    """Write a dataset directory (DESIGN.md) from prepared splits; returns `out`.

    splits[name] = {"images": N x H x W x C uint8 (raw) | list of encoded bytes / file paths / N x H x W x 3
    array (jpeg), "labels": int array (the true labels for "unlabeled": written to
    unlabeled.true_labels.npy, -1 in the files), "source_index": int array (default arange),
    optional "requested_class_counts" (-> manifest shortfall), optional "names" (per item, for errors)}.
    Everything is written to a temp dir next to `out`, the manifest last, then renamed into place.
    """
    out = Path(out).absolute()
    formats = tuple(formats)
    if encoding not in ("raw", "jpeg"):
        raise ConvertError(f"encoding {encoding!r} must be 'raw' or 'jpeg'")
    if unknown := set(formats) - set(FORMATS):
        raise ConvertError(f"unknown format(s) {sorted(unknown)}; use a subset of {','.join(FORMATS)}")
    if "train" not in splits:
        raise ConvertError(f"no 'train' split given (got {sorted(splits)})")
    workers = default_workers(workers)
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        manifest = _write_splits(tmp, splits, num_classes=num_classes, encoding=encoding, formats=formats,
                                 shard_size=shard_size, max_side=max_side, jpeg_quality=jpeg_quality,
                                 workers=workers, skip_bad=skip_bad)
        extra = dict(extra_manifest or {})
        manifest["skipped"] = list(extra.pop("skipped", [])) + manifest["skipped"]
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_splits(tmp: Path, splits, *, num_classes, encoding, formats, shard_size, max_side,
                  jpeg_quality, workers, skip_bad) -> dict:
    entries, skipped, image_info = {}, [], None
    for name, spec in splits.items():
        labeled = name != "unlabeled"
        labels = np.asarray(spec["labels"], dtype=np.int64)
        n = len(labels)
        index = np.asarray(spec.get("source_index", np.arange(n)), dtype=np.int64)
        images = spec["images"]
        if len(images) != n or len(index) != n:
            raise ConvertError(f"split {name!r}: {len(images)} images, {n} labels and {len(index)} source "
                               f"indices; they must have the same length")
        _check_labels(name, labels, num_classes, labeled)
        if encoding == "raw":
            images = np.asarray(images)
            if images.dtype != np.uint8 or images.ndim != 4:
                raise ConvertError(f"split {name!r}: raw images must be a uint8 N x H x W x C array, "
                                   f"got {images.dtype} {images.shape}")
            store = RawStore(images)
        else:
            names = spec.get("names") or [str(x) if isinstance(x, (str, Path)) else f"{name}[{i}] (source "
                                          f"index {index[i]})" for i, x in enumerate(images)]
            store, kept, bad = prepare_jpegs(images, tmp / f".{name}.jpegs", max_side=max_side,
                                             quality=jpeg_quality, workers=workers, names=names,
                                             skip_bad=skip_bad, desc=name)
            labels, index, skipped = labels[kept], index[kept], skipped + bad
        counts = np.bincount(labels[labels >= 0], minlength=num_classes)
        if name == "train" and (empty := np.flatnonzero(counts == 0)).size:
            raise ConvertError(f"split 'train': class {int(empty[0])} has no images ({len(empty)} empty "
                               f"classes); check the source / split file, --num-classes, or raise "
                               f"--max-per-class / lower --rho")
        file_labels = labels if labeled else np.full_like(labels, -1)
        entry = {"num_samples": int(len(labels)), "class_counts": counts.tolist(), "labeled": labeled}
        if "requested_class_counts" in spec:
            requested = np.asarray(spec["requested_class_counts"], dtype=np.int64)
            entry["requested_class_counts"] = requested.tolist()
            entry["shortfall"] = np.maximum(requested - counts, 0).tolist()
        if "ffcv" in formats:
            write_ffcv(tmp / f"{name}.beton", store, file_labels, index, max_side=max_side,
                       jpeg_quality=jpeg_quality, workers=workers)
            entry["ffcv"] = f"{name}.beton"
        if "dali" in formats:
            write_dali(tmp / "dali" / name, store, file_labels, index, shard_size=shard_size, desc=name)
            entry["dali"] = f"dali/{name}"
        np.savez(tmp / f"{name}.meta.npz", labels=file_labels, source_index=index)
        entry["meta"] = f"{name}.meta.npz"
        if not labeled:
            np.save(tmp / f"{name}.true_labels.npy", labels)
            entry["true_labels"] = f"{name}.true_labels.npy"
        if name == "train":
            mean, std = _mean_std(store, STATS_SAMPLE)
            shape = store.images.shape[1:] if encoding == "raw" else (None, None, 3)
            image_info = {"encoding": encoding, "height": shape[0], "width": shape[1], "channels": shape[2],
                          "max_side": max_side if encoding == "jpeg" else None,
                          "jpeg_quality": jpeg_quality if encoding == "jpeg" else None,
                          "mean": mean, "std": std}
        if encoding == "jpeg":
            (tmp / f".{name}.jpegs").unlink()
        entries[name] = entry
    return {"image": image_info, "splits": entries, "skipped": skipped}
