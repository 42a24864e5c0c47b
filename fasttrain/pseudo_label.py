"""Semi-supervised self-training as data (Yang & Xu 2020, sec. 3; their `gen_pseudolabels.py` +
`train_semi.py`): a base classifier trained on the labeled long-tailed set labels the unlabeled pool,
and the pool joins the labeled set as ONE training set:

    pseudo_label(base_run, data, out)          # -> out/pseudo_labels.npz (argmax of the base model)
    write_pseudo_dataset(data, table, out/data) # -> a dataset directory: train = labeled + pseudo-labeled
    --method supervised --data out/data         # the joint stage: an ordinary supervised run

The base model is the base run's final-epoch weights (`RUN/model.pt`). The paper's gen_pseudolabels.py
labels with whichever checkpoint its user passes (train.py keeps the last and the best-test-epoch one);
the final one is used here so that no test accuracy chooses the model that labels the pool.
As in the paper's code, every pool sample gets its argmax label (no threshold unless --pseudo-threshold
is given), the union is shuffled by the loader, an epoch is one pass over it and each step's loss is the
plain batch mean; class counts for re-weighting / DRW / LDAM / the samplers are the joint split's
counts (labeled + pseudo-labeled). Evaluation shot groups (many/medium/few) keep the LABELED counts,
recorded in the derived manifest as `labeled_class_counts`. The pool's true labels
(`unlabeled.true_labels.npy`) are never read here.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .data import build_loader
from .dataset import DatasetDir, DatasetError
from .files import atomic_file
from .models import build_model

PSEUDO_FILE = "pseudo_labels.npz"


def load_classifier(run: Path) -> tuple[torch.nn.Module, Config]:
    """The classifier of a finished run (`RUN/model.pt`, written by the engine) and the run's config."""
    path = run / "model.pt"
    if not path.is_file() or not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run}: no model.pt / config.yaml; pseudo-labels need a finished supervised run")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("method") in ("rotation", "moco"):
        raise ValueError(f"{run} is a {saved['method']} (self-supervised) run, not a classifier; pseudo-label "
                         f"with a supervised run")
    model = build_model(saved["arch"], saved["num_classes"], in_channels=saved["in_channels"],
                        width=saved["width"], head=saved["head"])
    model.load_state_dict(saved["state_dict"])
    return model, Config.load(run / "config.yaml")


@torch.no_grad()
def pseudo_label(base_run: Path, data: Path, out: Path, *, loader: str = "ffcv", batch_size: int = 512,
                 threshold: float = 0.0, accelerator=None, workers: int = 0) -> Path:
    """Label every sample of the `unlabeled` split of `data` with the base run's classifier and write
    `out/pseudo_labels.npz` (temp name + rename), per position: `position`, `source_index`, `label`
    (argmax), `confidence` (max softmax; LDAM models: softmax of scale * logits, their training softmax);
    plus `threshold` (the derived dataset keeps samples with confidence >= it; 0 = all) and the `base_run`
    and `data` used. With an accelerator, each rank labels its evaluation block (`batch_size` per process)
    and the main process writes the file. Returns its path."""
    base_run, out = Path(base_run), Path(out)
    dataset = DatasetDir(data)
    if not dataset.has_split("unlabeled"):
        raise DatasetError(f"{dataset.root}: no 'unlabeled' split to pseudo-label; convert the dataset with an "
                           f"unlabeled pool (data_prep.convert --unlabeled-factor ...)")
    model, cfg = load_classifier(base_run)
    if model.fc.out_features != dataset.num_classes:
        raise ValueError(f"{base_run}: its classifier has {model.fc.out_features} outputs but {dataset.root} has "
                         f"{dataset.num_classes} classes; pseudo-label with a supervised run on this dataset")
    from .methods.base import Method
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = build_loader(dataset, "unlabeled", kind=loader, batch_size=batch_size,
                           views=Method(cfg, dataset).views(train=False), train=False, rank=rank, world_size=world,
                           device=device, workers=workers)
    model.to(device).eval()
    scale = cfg.ldam_scale if cfg.loss == "ldam" else 1.0
    empty = torch.empty(0, dtype=torch.long, device=device)
    parts = [(empty, empty.float(), empty)]   # (label, confidence, source index) per batch
    with batches, accelerator.autocast() if accelerator else nullcontext():
        for batch in batches:
            confidence, label = (scale * model(batch.images).float()).softmax(1).max(1)
            parts.append((label, confidence, batch.indices))
    label, confidence, source_index = (_gather_blocks(torch.cat(t), accelerator) for t in zip(*parts))

    split = dataset.split("unlabeled")
    if not np.array_equal(source_index, split.source_index):
        raise RuntimeError(f"loader {loader!r} did not yield the unlabeled split in position order")
    path = out / PSEUDO_FILE
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as f:
            np.savez(f, position=np.arange(split.num_samples), source_index=source_index, label=label,
                     confidence=confidence.astype(np.float32), threshold=np.float32(threshold),
                     base_run=str(base_run.resolve()), data=str(dataset.root.resolve()))
    if accelerator:
        accelerator.wait_for_everyone()
    return path


def _gather_blocks(local: torch.Tensor, accelerator) -> np.ndarray:
    """Every rank's evaluation block (contiguous, rank order, sizes may differ by one) -> the whole split."""
    if accelerator is None or accelerator.num_processes == 1:
        return local.cpu().numpy()
    sizes = accelerator.gather(torch.tensor([len(local)], device=local.device)).tolist()
    padded = accelerator.gather(accelerator.pad_across_processes(local, dim=0)).view(len(sizes), -1)
    return torch.cat([block[:n] for block, n in zip(padded, sizes)]).cpu().numpy()


def read_pseudo_labels(path: str | Path, dataset: DatasetDir) -> dict[str, np.ndarray]:
    """`pseudo_labels.npz`, checked against the dataset's unlabeled split."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such pseudo-label file; write it with fasttrain.pseudo_label."
                                f"pseudo_label from a supervised run on {dataset.root}")
    split = dataset.split("unlabeled")
    with np.load(path) as z:
        table = {k: z[k] for k in ("source_index", "label", "confidence", "threshold")}
    if len(table["label"]) != split.num_samples or not np.array_equal(table["source_index"], split.source_index):
        raise DatasetError(f"{path}: {len(table['label'])} rows that do not match the {split.num_samples} samples "
                           f"of the unlabeled split of {dataset.root}; were they made for another dataset? "
                           f"Re-run pseudo_label on this one")
    if table["label"].min(initial=0) < 0 or table["label"].max(initial=0) >= dataset.num_classes:
        raise DatasetError(f"{path}: labels outside 0..{dataset.num_classes - 1}")
    return table


# ---------------------------------------------------------------- the derived (joint) dataset


def write_pseudo_dataset(data: str | Path, pseudo_labels: str | Path, out: str | Path, *,
                         threshold: float = 0.0, workers: int | None = None) -> Path:
    """Write the dataset directory `out` whose `train` split is every labeled train sample of `data`
    followed by every pool sample with its pseudo-label (confidence >= `threshold`, or the file's own
    threshold, whichever is larger; 0 keeps all), in the formats of `data`'s train split, with the image
    bytes copied from `data` (DALI shards). `test` / `val` point to `data`'s files. The manifest records
    the provenance and counts; the directory is built under a temporary name and renamed, the manifest
    written last: `out` exists only complete. Returns `out`."""
    from data_prep.convert import _checksums, _versions
    from data_prep.writers import RawStore, default_workers

    base, out = DatasetDir(data), Path(out).absolute()
    if (out / "manifest.json").exists():
        raise FileExistsError(f"{out} already holds a dataset (manifest.json); delete it to write it again")
    table = read_pseudo_labels(pseudo_labels, base)
    threshold = max(float(threshold), float(table["threshold"]))
    keep = np.flatnonzero(table["confidence"] >= threshold) if threshold > 0 else np.arange(len(table["label"]))
    if keep.size == 0:
        raise ValueError(f"{pseudo_labels}: no pseudo-label has confidence >= {threshold}; lower --pseudo-threshold")
    train, pool = base.split("train"), base.split("unlabeled")
    num_classes = base.num_classes
    labeled_counts = np.bincount(train.labels, minlength=num_classes)
    pseudo = table["label"][keep].astype(np.int64)
    pseudo_counts = np.bincount(pseudo, minlength=num_classes)
    labels = np.concatenate([train.labels, pseudo])
    source_index = np.concatenate([train.source_index, pool.source_index[keep]])
    is_pseudo = np.concatenate([np.zeros(train.num_samples, bool), np.ones(len(keep), bool)])
    formats = [f for f, p in (("ffcv", train.ffcv_path), ("dali", train.dali_dir)) if p is not None]
    workers = default_workers(workers)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if base.is_raw:
            store = RawStore(np.concatenate([_raw_images(base, train), _raw_images(base, pool)[keep]]))
        else:
            store = _jpeg_store(base, train, pool, keep, tmp / ".train.jpegs")
        _write_train(tmp, store, labels, source_index, formats, base, workers)
        if not base.is_raw:
            (tmp / ".train.jpegs").unlink()
        np.savez(tmp / "train.meta.npz", labels=labels, source_index=source_index, pseudo_labeled=is_pseudo)
        base_manifest = base.root / "manifest.json"
        entry = {"num_samples": int(len(labels)), "class_counts": (labeled_counts + pseudo_counts).tolist(),
                 "labeled": True, "labeled_class_counts": labeled_counts.tolist(),
                 "pseudo_class_counts": pseudo_counts.tolist(), "meta": "train.meta.npz"}
        if "ffcv" in formats:
            entry["ffcv"] = "train.beton"
        if "dali" in formats:
            entry["dali"] = "dali/train"
        splits = {"train": entry}
        for name in ("test", "val"):          # referenced, not copied: paths relative to this directory
            if base.has_split(name):
                splits[name] = dict(base.manifest["splits"][name], root=os.path.relpath(base.root.absolute(), out))
        m = base.manifest
        manifest = {
            "format_version": m["format_version"], "source": m.get("source"), "source_root": m.get("source_root"),
            "num_classes": num_classes, "class_names": base.class_names,
            "image": m["image"],              # the base set's normalisation: the joint model sees the same inputs
            "longtail": m.get("longtail"),
            "pseudo_labeled": {
                "base_dataset": str(base.root.resolve()),
                "base_manifest_sha256": "sha256:" + hashlib.sha256(base_manifest.read_bytes()).hexdigest(),
                "pseudo_labels": str(Path(pseudo_labels).resolve()),
                "pseudo_labels_sha256": "sha256:" + hashlib.sha256(Path(pseudo_labels).read_bytes()).hexdigest(),
                "threshold": threshold,
                "counts": {"labeled": int(train.num_samples), "pool": int(pool.num_samples),
                           "pseudo": int(len(keep)), "joint": int(len(labels)),
                           "labeled_per_class": labeled_counts.tolist(), "pseudo_per_class": pseudo_counts.tolist(),
                           "joint_per_class": (labeled_counts + pseudo_counts).tolist()}},
            "splits": splits,
            "checksums": _checksums(tmp, workers), "versions": _versions(),
            "command": " ".join(map(shlex.quote, [sys.executable] + sys.argv)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "manifest.json.part").write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp / "manifest.json.part", tmp / "manifest.json")
        if out.exists():                       # an empty or incomplete leftover (no manifest)
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_train(tmp: Path, store, labels, source_index, formats, base: DatasetDir, workers: int) -> None:
    from data_prep.writers import write_dali, write_ffcv
    image = base.image
    if "ffcv" in formats:
        write_ffcv(tmp / "train.beton", store, labels, source_index, max_side=image.get("max_side") or 256,
                   jpeg_quality=image.get("jpeg_quality") or 90)
    if "dali" in formats:
        shards = sorted(base.split("train").dali_dir.glob("shard-*.tar"))
        shard_size = _shard_size(shards[0]) if shards else 1000
        write_dali(tmp / "dali" / "train", store, labels, source_index, shard_size=shard_size, desc="joint")


def _shard_size(tar: Path) -> int:
    """Samples per shard of the base set (the first shard's index line count)."""
    return int(tar.with_suffix(".idx").read_text().split(None, 2)[1])


def _shards(base: DatasetDir, split):
    """The split's DALI shards (the images' bytes as stored), which the joint dataset copies."""
    from .data.shards import ShardReader
    if split.dali_dir is None or not split.dali_dir.exists():
        raise DatasetError(f"{base.root}: split {split.name!r} has no DALI shards, which the pseudo-labeled "
                           f"dataset copies its images from; convert with `--formats ffcv,dali`")
    return ShardReader(split.dali_dir)


def _raw_images(base: DatasetDir, split) -> np.ndarray:
    shape = (int(base.image["height"]), int(base.image["width"]), base.channels)
    return _shards(base, split).raw_images(shape)


def _jpeg_store(base: DatasetDir, train, pool, keep: np.ndarray, path: Path):
    """The stored JPEG bytes of the labeled set then the kept pool samples, unchanged, as a JpegStore."""
    import io

    from PIL import Image

    from data_prep.writers import JpegStore
    offsets, shapes = [0], []
    with open(path, "wb") as f:
        for reader, positions in ((_shards(base, train), range(train.num_samples)), (_shards(base, pool), keep)):
            for pos in positions:
                data = reader.image_bytes(int(pos)).tobytes()
                f.write(data)
                offsets.append(offsets[-1] + len(data))
                width, height = Image.open(io.BytesIO(data)).size   # the header only
                shapes.append((height, width))
    return JpegStore(path, np.asarray(offsets, np.int64), np.asarray(shapes, np.int64).reshape(-1, 2))
