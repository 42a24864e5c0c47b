"""Loader throughput (images/s) on the same data, in one run:

  torch_pil        the plain standard approach: ImageFolder-style dataset over JPEG files on disk (raw set:
                   over the uint8 array), PIL decode + RandomResizedCrop (raw: pad-crop) + flip, ToTensor +
                   normalize per sample in DataLoader workers
  ffcv_raw         FFCV's Loader used directly: its decoder, RandomHorizontalFlip (raw: + RandomTranslate),
                   ToTensor, ToTorchImage, then the same normalization to float as fasttrain
  fasttrain_<kind> fasttrain.data.build_loader(kind=...) for ffcv, dali, torch, device

on ImageNet-like JPEGs (300-500 px, ~90 KB, converted with max_side=256) at RandomResizedCrop + flip, and
on 32 px raw images at pad-crop + flip. One warm-up epoch (JIT compilation, page cache), then `--epochs`
timed epochs. Writes JSON (machine, versions, settings, img/s, acceptance ratios) and a PNG bar plot.

    python benchmarks/loader_throughput.py --out benchmarks/results/loader_throughput.json
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data_prep.convert import write_dataset
from fasttrain.data import augment, build_loader
from fasttrain.dataset import DatasetDir

KINDS = ("ffcv", "dali", "torch", "device")


# ---------------------------------------------------------------- data


def synth_jpeg(rng: np.random.Generator, quality: int = 90) -> bytes:
    """An ImageNet-like JPEG: 300-500 px a side, smooth structure plus texture, ~90 KB."""
    h, w = rng.integers(300, 501, size=2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        fy, fx = rng.uniform(0.005, 0.05, 2)
        img[..., c] = 128 + 80 * np.sin(fy * yy + rng.uniform(0, 6.3)) * np.cos(fx * xx)
    img += rng.normal(0, 24, (h, w, 3)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_data(root: Path, num_jpeg: int, num_raw: int, num_classes: int = 10) -> dict:
    rng = np.random.default_rng(0)
    files, labels = [], rng.integers(0, num_classes, num_jpeg)
    for i, label in enumerate(labels):
        path = root / "jpeg_files" / f"class_{label:02d}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(synth_jpeg(rng))
        files.append(path)
    write_dataset(root / "jpeg", {"train": {"images": files, "labels": labels}}, num_classes=num_classes,
                  encoding="jpeg", max_side=256)
    raw = rng.integers(0, 256, (num_raw, 32, 32, 3), dtype=np.uint8)
    raw_labels = rng.integers(0, num_classes, num_raw)
    write_dataset(root / "raw", {"train": {"images": raw, "labels": raw_labels}}, num_classes=num_classes,
                  encoding="raw")
    return {"jpeg_files": files, "jpeg_labels": labels, "raw": raw, "raw_labels": raw_labels,
            "mean_jpeg_kb": float(np.mean([p.stat().st_size for p in files]) / 1e3)}


# ---------------------------------------------------------------- torch_pil


def _random_resized_crop(img: Image.Image, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop rule, on a PIL image."""
    width, height = img.size
    for _ in range(10):
        area = width * height * random.uniform(*scale)
        aspect = np.exp(random.uniform(np.log(ratio[0]), np.log(ratio[1])))
        w, h = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = random.randint(0, width - w), random.randint(0, height - h)
            return img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))


def _to_normalized_tensor(img: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """ToTensor + Normalize."""
    x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float().div(255)
    return (x - mean) / std


class JpegFolder(Dataset):
    def __init__(self, files, labels, size, mean, std):
        self.files, self.labels, self.size = files, labels, size
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1) / 255, torch.tensor(std).view(3, 1, 1) / 255

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = _random_resized_crop(Image.open(self.files[i]).convert("RGB"), self.size)
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_normalized_tensor(img, self.mean, self.std), int(self.labels[i])


class RawArray(Dataset):
    """CIFAR-style: PIL image from the array, pad 4 + random crop, flip."""

    def __init__(self, images, labels, mean, std):
        self.images, self.labels = images, labels
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1) / 255, torch.tensor(std).view(3, 1, 1) / 255

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        padded = Image.new("RGB", (img.width + 8, img.height + 8))
        padded.paste(img, (4, 4))
        left, top = random.randint(0, 8), random.randint(0, 8)
        img = padded.crop((left, top, left + img.width, top + img.height))
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_normalized_tensor(img, self.mean, self.std), int(self.labels[i])


def torch_pil_loader(dataset: Dataset, batch_size: int, workers: int):
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        persistent_workers=True)

    class Epochs:
        def set_epoch(self, epoch):
            pass

        def __iter__(self):
            for images, _ in loader:
                yield images

    return Epochs()


# ---------------------------------------------------------------- ffcv_raw


def ffcv_raw_loader(ds: DatasetDir, batch_size: int, workers: int, size: int | None):
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, ToTensor, ToTorchImage

    decode = [NDArrayDecoder(), RandomTranslate(padding=4)] if size is None else \
        [RandomResizedCropRGBImageDecoder((size, size))]
    image = [*decode, RandomHorizontalFlip(), ToTensor(), ToTorchImage()]
    loader = Loader(str(ds.split("train").ffcv_path), batch_size=batch_size, num_workers=workers,
                    order=OrderOption.RANDOM, os_cache=True, drop_last=True, batches_ahead=3,
                    pipelines={"image": image, "label": [IntDecoder(), ToTensor()], "index": None})
    mean, std = augment.stats(ds.mean, "cpu"), augment.stats(ds.std, "cpu")

    class Epochs:
        def set_epoch(self, epoch):
            loader.next_epoch = epoch

        def __iter__(self):
            for images, _ in loader:    # the same normalization to float as fasttrain's stage 2
                yield images.to(torch.float32, memory_format=torch.contiguous_format).sub_(mean).div_(std)

    return Epochs()


# ---------------------------------------------------------------- timing


def images_per_second(loader, epochs: int) -> dict:
    loader.set_epoch(0)
    for _ in loader:                                  # warm-up: JIT compilation, workers, page cache
        pass
    load_before = os.getloadavg()[0]
    count, start = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        for batch in loader:
            count += len(batch)
    seconds = time.perf_counter() - start
    return {"img_per_s": round(count / seconds, 1), "images": count, "seconds": round(seconds, 2),
            "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def run_set(name: str, ds: DatasetDir, torch_dataset: Dataset, views, size, args) -> dict:
    candidates = {
        "torch_pil": lambda: torch_pil_loader(torch_dataset, args.batch_size, args.workers),
        "ffcv_raw": lambda: ffcv_raw_loader(ds, args.batch_size, args.workers, size),
        **{f"fasttrain_{kind}": (lambda kind=kind: build_loader(
            ds, "train", kind=kind, batch_size=args.batch_size, views=views, train=True,
            workers=args.workers)) for kind in KINDS},
    }
    results = {}
    for loader_name, make in candidates.items():
        torch.set_num_threads(args.workers)           # FFCV changes it; same for everyone
        results[loader_name] = images_per_second(make(), args.epochs)
        print(f"[{name}] {loader_name}: {results[loader_name]['img_per_s']:.0f} img/s "
              f"(load {results[loader_name]['load_avg_1min']})", flush=True)
    return results


# ---------------------------------------------------------------- report


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"cores": len(os.sched_getaffinity(0)), "cpu_model": cpu, "platform": platform.platform(),
            "python": platform.python_version(),
            "versions": {name: version(name) for name in ("torch", "ffcv", "nvidia-dali-cuda120", "numpy",
                                                            "pillow", "numba", "opencv-python")}}


def acceptance(results: dict) -> dict:
    r = {name: v["img_per_s"] for name, v in results.items()}
    return {"ffcv_over_torch_pil": round(r["fasttrain_ffcv"] / r["torch_pil"], 2),
            "ffcv_over_ffcv_raw": round(r["fasttrain_ffcv"] / r["ffcv_raw"], 3),
            "passes": r["fasttrain_ffcv"] >= 3 * r["torch_pil"] and r["fasttrain_ffcv"] >= 0.9 * r["ffcv_raw"]}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(report["results"])
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.2))
    for ax, name in zip(np.atleast_1d(axes), sets):
        names = list(report["results"][name])
        values = [report["results"][name][n]["img_per_s"] for n in names]
        bars = ax.bar(names, values, color=["#999999", "#5b8def"] + ["#e07b39"] * (len(names) - 2))
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_title(f"{name}: {report['settings'][name]}", fontsize=9)
        ax.set_ylabel("images / s")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle(f"loader throughput, {report['machine']['cores']} cores, {report['machine']['cpu_model']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/loader_throughput.json")
    p.add_argument("--num-jpeg", type=int, default=640)
    p.add_argument("--num-raw", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--size", type=int, default=160, help="RandomResizedCrop output side (jpeg set)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--sets", default="jpeg,raw")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_info(), "settings": {}, "results": {}, "acceptance": {}}
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        data = make_data(Path(tmp), args.num_jpeg, args.num_raw)
        for name in args.sets.split(","):
            ds = DatasetDir(Path(tmp) / name)
            if name == "jpeg":
                torch_dataset = JpegFolder(data["jpeg_files"], data["jpeg_labels"], args.size, ds.mean, ds.std)
                views, size = [augment.large_train(args.size)], args.size
                report["settings"][name] = (f"{args.num_jpeg} JPEGs 300-500 px ({data['mean_jpeg_kb']:.0f} KB),"
                                            f" max_side 256, RRC {args.size} + flip, batch {args.batch_size}")
            else:
                torch_dataset = RawArray(data["raw"], data["raw_labels"], ds.mean, ds.std)
                views, size = [augment.small_train()], None
                report["settings"][name] = (f"{args.num_raw} raw 32x32x3, pad 4 + crop + flip, "
                                            f"batch {args.batch_size}")
            report["results"][name] = run_set(name, ds, torch_dataset, views, size, args)
            report["acceptance"][name] = acceptance(report["results"][name])
    report["settings"].update(workers=args.workers, epochs_timed=args.epochs, warmup_epochs=1)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out.with_suffix(".png"))
    print(json.dumps(report["acceptance"], indent=1))
    return report


if __name__ == "__main__":
    main()
