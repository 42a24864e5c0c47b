"""Loader throughput (images/s) on the same data, in one run:

  torch_pil        the plain standard approach: ImageFolder-style dataset over JPEG files on disk (raw set:
                   over the uint8 array), PIL decode + RandomResizedCrop (raw: pad-crop) + flip, ToTensor +
                   normalize per sample in DataLoader workers
  ffcv_raw         FFCV's Loader used directly: its decoder, RandomHorizontalFlip (raw: + RandomTranslate),
                   ToTensor, ToTorchImage, then the normalization to float32 N x C x H x W in torch that
                   fasttrain's stage 2 does
  fasttrain_<kind> fasttrain.data.build_loader(kind=...) for ffcv, dali, torch, device

on ImageNet-like JPEGs (300-500 px, ~90 KB, converted with max_side=256) at RandomResizedCrop + flip, and
on 32 px raw images at pad-crop + flip; all produce the same normalized float32 batches. Each loader gets
a warm-up epoch (JIT compilation, page cache), then `--rounds` rounds of `--epochs` timed epochs with the
loaders interleaved; img/s is the best round. It also records CPU ms per image (this process and its
workers), which other load on a shared machine disturbs much less than wall-clock time.
Writes JSON (machine, versions, settings, results, acceptance ratios) and a PNG bar plot next to it.

    python benchmarks/loader_throughput.py --out benchmarks/results/loader_throughput.json
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from common import formats, machine_info, natural_jpeg, synchronize
from common import labels as class_labels  # noqa: E402  (benchmarks/common.py)

from data_prep.convert import write_dataset
from fasttrain.data import augment, build_loader
from fasttrain.dataset import DatasetDir

KINDS = ("ffcv", "dali", "torch", "device")


# ---------------------------------------------------------------- data


# ---------------------------------------------------------------- torch_pil (torchvision's transforms)


def random_resized_crop(img: Image.Image, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """torchvision.transforms.RandomResizedCrop on a PIL image: get_params, then crop + resize."""
    width, height = img.size
    for _ in range(10):
        area = width * height * random.uniform(*scale)
        aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = random.randint(0, height - h), random.randint(0, width - w)
            break
    else:
        w = h = min(width, height)
        top, left = (height - h) // 2, (width - w) // 2
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """torchvision.transforms.ToTensor."""
    x = torch.from_numpy(np.array(img, np.uint8, copy=True))
    x = x.view(img.size[1], img.size[0], len(img.getbands()))
    return x.permute(2, 0, 1).contiguous().to(dtype=torch.float32).div(255)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """torchvision.transforms.Normalize (not in place)."""
    return x.clone().sub_(mean).div_(std)


class JpegFolder(Dataset):
    """ImageFolder-style: PIL open + convert('RGB'), RandomResizedCrop, RandomHorizontalFlip, ToTensor,
    Normalize."""

    def __init__(self, files, labels, size, mean, std):
        self.files, self.labels, self.size = files, labels, size
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1) / 255, torch.tensor(std).view(3, 1, 1) / 255

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with open(self.files[i], "rb") as f:
            img = random_resized_crop(Image.open(f).convert("RGB"), self.size)
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return normalize(to_tensor(img), self.mean, self.std), int(self.labels[i])


class RawArray(Dataset):
    """torchvision CIFAR-style: Image.fromarray, RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor,
    Normalize."""

    def __init__(self, images, labels, mean, std):
        self.images, self.labels = images, labels
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1) / 255, torch.tensor(std).view(3, 1, 1) / 255

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = ImageOps.expand(Image.fromarray(self.images[i]), border=4, fill=0)
        left, top = random.randint(0, 8), random.randint(0, 8)
        img = img.crop((left, top, left + 32, top + 32))
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return normalize(to_tensor(img), self.mean, self.std), int(self.labels[i])


def torch_pil_loader(dataset: Dataset, batch_size: int, workers: int):
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers)

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


def cpu_seconds() -> float:
    """CPU time of this process, its finished children and its live children (DataLoader workers)."""
    own, done = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    live = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            live += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return own.ru_utime + own.ru_stime + done.ru_utime + done.ru_stime + live


def time_epochs(loader, first_epoch: int, epochs: int, device="cpu") -> dict:
    """Wall seconds and CPU seconds of `epochs` epochs, and the images they yielded."""
    synchronize(device)
    load_before, cpu_before, start, count = os.getloadavg()[0], cpu_seconds(), time.perf_counter(), 0
    for epoch in range(first_epoch, first_epoch + epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            count += len(batch)
    synchronize(device)
    return {"img_per_s": count / (time.perf_counter() - start),
            "cpu_ms_per_img": (cpu_seconds() - cpu_before) / count * 1e3, "images": count,
            "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def run_set(name: str, ds: DatasetDir, torch_dataset: Dataset, views, size, args) -> dict:
    """Every loader warmed up (one epoch: JIT compilation, workers, page cache), then `rounds` rounds of
    `epochs` timed epochs, the loaders interleaved so that they share the machine's quiet and busy
    moments; img/s is the best round (timeit's rule: other load only slows down), CPU ms the median."""
    makers = {
        "torch_pil": lambda: torch_pil_loader(torch_dataset, args.batch_size, args.workers),
        "ffcv_raw": lambda: ffcv_raw_loader(ds, args.batch_size, args.workers, size),
        **{f"fasttrain_{kind}": functools.partial(build_loader, ds, "train", kind=kind, batch_size=args.batch_size,
                                                  views=views, train=True, workers=args.workers, device=args.device)
           for kind in KINDS},
    }
    loaders = {name: make() for name, make in makers.items() if name in args.loaders.split(",")}
    for loader in loaders.values():
        time_epochs(loader, 0, 1, args.device)
    rounds = {loader_name: [] for loader_name in loaders}
    for r in range(args.rounds):
        for loader_name, loader in loaders.items():
            torch.set_num_threads(args.workers)       # FFCV changes it; the same for everyone
            rounds[loader_name].append(time_epochs(loader, 1 + r * args.epochs, args.epochs, args.device))
    results = {}
    for loader_name, timed in rounds.items():
        speeds = [t["img_per_s"] for t in timed]
        cpu_ms = float(np.median([t["cpu_ms_per_img"] for t in timed]))
        results[loader_name] = {"img_per_s": round(max(speeds), 1),
                                "img_per_s_median": round(float(np.median(speeds)), 1),
                                "cpu_ms_per_img": round(cpu_ms, 3), "images_per_round": timed[0]["images"],
                                "load_avg_1min": [t["load_avg_1min"] for t in timed]}
        print(f"[{name}] {loader_name}: {results[loader_name]['img_per_s']:.0f} img/s best, "
              f"{results[loader_name]['img_per_s_median']:.0f} median, "
              f"{results[loader_name]['cpu_ms_per_img']:.3f} CPU ms/img", flush=True)
    return results


# ---------------------------------------------------------------- report


def acceptance(results: dict) -> dict:
    """The issue's bars: fasttrain_ffcv >= 3x torch_pil and >= 0.9x ffcv_raw, in img/s; the same ratios
    in CPU time per image, which other load on the machine disturbs much less."""
    speed = {name: v["img_per_s"] for name, v in results.items()}
    cost = {name: v["cpu_ms_per_img"] for name, v in results.items()}
    if not {"fasttrain_ffcv", "torch_pil", "ffcv_raw"} <= set(speed):
        return {"skipped": "needs fasttrain_ffcv, torch_pil and ffcv_raw in --loaders"}
    return {"ffcv_over_torch_pil": round(speed["fasttrain_ffcv"] / speed["torch_pil"], 2),
            "ffcv_over_ffcv_raw": round(speed["fasttrain_ffcv"] / speed["ffcv_raw"], 3),
            "passes": speed["fasttrain_ffcv"] >= 3 * speed["torch_pil"] and
            speed["fasttrain_ffcv"] >= 0.9 * speed["ffcv_raw"],
            "cpu_ffcv_over_torch_pil": round(cost["torch_pil"] / cost["fasttrain_ffcv"], 2),
            "cpu_ffcv_over_ffcv_raw": round(cost["ffcv_raw"] / cost["fasttrain_ffcv"], 3)}


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
        ax.bar_label(bars, fontsize=7, labels=[f"{v:.0f}\n{report['results'][name][n]['cpu_ms_per_img']:.3g} ms"
                                                for n, v in zip(names, values)])
        ax.set_ylim(0, 1.2 * max(values))
        ax.set_title(f"{name}: {report['settings'][name]}", fontsize=9)
        ax.set_ylabel("images / s  (labels: img/s, CPU ms per image)")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle(f"loader throughput, {report['machine']['cores']} cores, {report['machine']['cpu_model']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- main


def jpeg_set(root: Path, args, num_classes: int = 10):
    """JPEG files on disk (for torch_pil) and the same images converted (max_side 256)."""
    rng = np.random.default_rng(0)
    files, labels = [], class_labels(rng, args.num_jpeg, num_classes)
    for i, label in enumerate(labels):
        path = root / "jpeg_files" / f"class_{label:02d}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(natural_jpeg(rng))
        files.append(path)
    ds = DatasetDir(write_dataset(root / "jpeg", {"train": {"images": files, "labels": labels}},
                                  num_classes=num_classes, encoding="jpeg", max_side=256, formats=formats()))
    kb = np.mean([p.stat().st_size for p in files]) / 1e3
    setting = (f"{args.num_jpeg} JPEGs 300-500 px ({kb:.0f} KB), max_side 256, RRC {args.size} + flip, "
               f"batch {args.batch_size}")
    torch_dataset = JpegFolder(files, labels, args.size, ds.mean, ds.std)
    return ds, torch_dataset, [augment.large_train(args.size)], args.size, setting


def raw_set(root: Path, args, num_classes: int = 10):
    """32 x 32 x 3 random pixels, stored raw."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (args.num_raw, 32, 32, 3), dtype=np.uint8)
    labels = class_labels(rng, args.num_raw, num_classes)
    ds = DatasetDir(write_dataset(root / "raw", {"train": {"images": images, "labels": labels}},
                                  num_classes=num_classes, encoding="raw", formats=formats()))
    setting = f"{args.num_raw} raw 32x32x3, pad 4 + crop + flip, batch {args.batch_size}"
    return ds, RawArray(images, labels, ds.mean, ds.std), [augment.small_train()], None, setting


SETS = {"jpeg": jpeg_set, "raw": raw_set}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/loader_throughput.json")
    p.add_argument("--num-jpeg", type=int, default=1024)
    p.add_argument("--num-raw", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds, loaders interleaved")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--size", type=int, default=160, help="RandomResizedCrop output side (jpeg set)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--sets", default="jpeg,raw")
    p.add_argument("--loaders", default="torch_pil,ffcv_raw," + ",".join(f"fasttrain_{k}" for k in KINDS),
                   help="which of torch_pil, ffcv_raw, fasttrain_<kind> to time")
    p.add_argument("--device", default="cpu", help="where fasttrain loaders put their batches (e.g. cuda)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_info(), "settings": {}, "results": {}, "acceptance": {}}
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        for name in args.sets.split(","):
            ds, torch_dataset, views, size, report["settings"][name] = SETS[name](Path(tmp), args)
            report["results"][name] = run_set(name, ds, torch_dataset, views, size, args)
            report["acceptance"][name] = acceptance(report["results"][name])
    report["settings"].update(workers=args.workers, device=args.device, warmup_epochs=1, rounds=args.rounds,
                              epochs_per_round=args.epochs, img_per_s="best round", cpu_ms_per_img="median round")
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out.with_suffix(".png"))
    print(json.dumps(report["acceptance"], indent=1))
    return report


if __name__ == "__main__":
    main()
