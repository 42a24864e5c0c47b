"""Loader throughput (images/s) on the same data, in one run:

  torch_pil        the plain standard approach: ImageFolder-style dataset over JPEG files on disk (raw set:
                   over the uint8 array), PIL decode + RandomResizedCrop (raw: pad-crop) + flip, ToTensor +
                   normalize per sample in DataLoader workers
  ffcv_raw         FFCV's Loader used directly: its decoder, RandomHorizontalFlip (raw: + RandomTranslate),
                   ToTensor, ToTorchImage, then the normalization to float32 N x C x H x W in torch that
                   fasttrain's stage 2 does
  fasttrain_<kind> fasttrain.data.build_loader(kind=...) for ffcv, dali, torch, device
  decode_<library> decode-only references: the same JPEGs decoded to RGB and nothing else, with the library a
                   loader decodes with (pil: PIL, the torch and device loaders and torch_pil; ffcv: FFCV's
                   libjpeg-turbo call, ffcv_raw and fasttrain_ffcv; dali: DALI's CPU decoder) on the same number
                   of threads: the limit of those loaders, as each loader's `of_decode_limit` says

on ImageNet-like JPEGs (300-500 px, ~85 KB) stored two ways: `jpeg` as the converter's default stores them
(originals, byte for byte) and `jpeg_256` with the speed option --max-side 256 (shorter side 256), at
RandomResizedCrop + flip; and on 32 px raw images at pad-crop + flip; all produce the same normalized float32
batches. Each loader gets a warm-up epoch (JIT compilation, page cache), then `--rounds` rounds of `--epochs`
timed epochs with the loaders of both JPEG sets interleaved (the machine may be shared: each timing records
the 1-minute load average before and after it); img/s is the best round. It also records CPU ms per image
(this process and its workers), which other load disturbs much less than wall-clock time, the fraction of
the decode-only limit in both, and per JPEG set the stored bytes and pixels per image and the conversion
speed (best of two conversions).
Writes JSON (machine, versions, settings, results, acceptance ratios) and a PNG bar plot next to it.

    python benchmarks/loader_throughput.py --out benchmarks/results/loader_throughput.json
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import random
import resource
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from concurrent.futures import ThreadPoolExecutor
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from common import formats, machine_info, natural_jpeg, synchronize
from common import labels as class_labels  # noqa: E402  (benchmarks/common.py)

from data_prep.convert import write_dataset
from data_prep.sources import PAPER_NORMALIZATION
from fasttrain.data import augment, build_loader
from fasttrain.data.shards import ShardReader
from fasttrain.dataset import DatasetDir

KINDS = ("ffcv", "dali", "torch", "device")
DECODERS = ("pil", "ffcv", "dali")
DECODE_LIMIT = {"torch_pil": "pil", "ffcv_raw": "ffcv", "fasttrain_ffcv": "ffcv", "fasttrain_dali": "dali",
                "fasttrain_torch": "pil"}   # fasttrain_device decodes once, before its first epoch: no limit


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


# ---------------------------------------------------------------- decode-only references


class DecodeOnly:
    """Every stored JPEG of the split decoded to RGB, `batch_size` at a time on `workers` threads, in a random
    order per epoch; nothing else. Yields the decoded batch (a list of images)."""

    def __init__(self, ds: DatasetDir, library: str, batch_size: int, workers: int):
        reader = ShardReader(ds.split("train").dali_dir)
        self.batch_size, self.workers, self.epoch = batch_size, workers, 0
        self.data = [reader.image_bytes(p) for p in range(len(reader))]
        self.shapes = [Image.open(io.BytesIO(d)).size[::-1] for d in self.data]
        self.decode_batch = {"pil": self._pil, "ffcv": self._ffcv, "dali": self._dali}[library]()

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = np.random.default_rng(self.epoch).permutation(len(self.data))
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            yield self.decode_batch(order[start:start + self.batch_size])

    def _pil(self):
        pool = ThreadPoolExecutor(self.workers)

        def decode(i):
            return np.asarray(Image.open(io.BytesIO(self.data[i])).convert("RGB"))
        return lambda positions: list(pool.map(decode, positions))

    def _ffcv(self):
        import fasttrain.ffcv_import  # noqa: F401
        from ffcv.libffcv import imdecode        # FFCV's libjpeg-turbo call (ctypes: no GIL while decoding)
        pool = ThreadPoolExecutor(self.workers)

        def decode(i):
            h, w = self.shapes[i]
            out = np.empty((h, w, 3), np.uint8)
            imdecode(self.data[i], out, h, w, h, w, 0, 0, 1, 1, False, False)
            return out
        return lambda positions: list(pool.map(decode, positions))

    def _dali(self):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import Pipeline
        feed = []
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.workers, device_id=None, prefetch_queue_depth=1)
        with pipe:
            encoded = fn.external_source(source=lambda: feed.pop(), batch=True, dtype=types.UINT8)
            pipe.set_outputs(fn.decoders.image(encoded, device="cpu", output_type=types.RGB))
        pipe.build()

        def run(positions):
            feed.append([self.data[i] for i in positions])
            (out,) = pipe.run()
            return [out.at(i) for i in range(len(positions))]
        return run


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


def loaders_of(ds: DatasetDir, torch_dataset: Dataset, views, size, args) -> dict:
    makers = {
        "torch_pil": lambda: torch_pil_loader(torch_dataset, args.batch_size, args.workers),
        "ffcv_raw": lambda: ffcv_raw_loader(ds, args.batch_size, args.workers, size),
        **{f"fasttrain_{kind}": functools.partial(build_loader, ds, "train", kind=kind, batch_size=args.batch_size,
                                                  views=views, train=True, workers=args.workers, device=args.device)
           for kind in KINDS},
        **({} if ds.is_raw else {f"decode_{lib}": functools.partial(DecodeOnly, ds, lib, args.batch_size, args.workers)
                                 for lib in DECODERS}),
    }
    return {name: make() for name, make in makers.items() if name in args.loaders.split(",")}


def run_sets(sets: dict, args) -> dict:
    """Every loader of every set warmed up (one epoch: JIT compilation, workers, page cache), then `rounds`
    rounds of `epochs` timed epochs, all loaders of all sets interleaved so that they share the machine's
    quiet and busy moments; img/s is the best round (timeit's rule: other load only slows down), CPU ms the
    median. Each loader also gets `of_decode_limit`: its img/s over its decoding library's decode-only img/s."""
    loaders = {(set_name, name): loader for set_name, spec in sets.items()
               for name, loader in loaders_of(*spec, args).items()}
    for loader in loaders.values():
        time_epochs(loader, 0, 1, args.device)
    rounds = {key: [] for key in loaders}
    for r in range(args.rounds):
        for key, loader in loaders.items():
            torch.set_num_threads(args.workers)       # FFCV changes it; the same for everyone
            rounds[key].append(time_epochs(loader, 1 + r * args.epochs, args.epochs, args.device))
    results = {set_name: {} for set_name in sets}
    for (set_name, name), timed in rounds.items():
        speeds = [t["img_per_s"] for t in timed]
        cpu_ms = float(np.median([t["cpu_ms_per_img"] for t in timed]))
        results[set_name][name] = {"img_per_s": round(max(speeds), 1),
                                   "img_per_s_median": round(float(np.median(speeds)), 1),
                                   "cpu_ms_per_img": round(cpu_ms, 3), "images_per_round": timed[0]["images"],
                                   "load_avg_1min": [t["load_avg_1min"] for t in timed]}
    for set_name, rows in results.items():
        for name, row in rows.items():
            limit = rows.get(f"decode_{DECODE_LIMIT.get(name)}")
            if limit:      # in img/s, and in CPU time per image (steadier on a shared machine)
                row["of_decode_limit"] = round(row["img_per_s"] / limit["img_per_s"], 3)
                row["of_decode_limit_cpu"] = round(limit["cpu_ms_per_img"] / row["cpu_ms_per_img"], 3)
            print(f"[{set_name}] {name}: {row['img_per_s']:.0f} img/s best, {row['img_per_s_median']:.0f} median, "
                  f"{row['cpu_ms_per_img']:.3f} CPU ms/img"
                  + (f", {row['of_decode_limit']:.2f} of decode-only ({row['of_decode_limit_cpu']:.2f} in CPU time)"
                     if "of_decode_limit" in row else ""), flush=True)
    return results


# ---------------------------------------------------------------- report


def acceptance(results: dict) -> dict:
    """The loader targets: fasttrain_ffcv >= 3x torch_pil and >= 0.9x ffcv_raw, in img/s; the same ratios
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
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.6))
    for ax, name in zip(np.atleast_1d(axes), sets):
        names = list(report["results"][name])
        values = [report["results"][name][n]["img_per_s"] for n in names]
        colors = {"torch_pil": "#999999", "ffcv_raw": "#5b8def"}
        bars = ax.bar(names, values, color=[colors.get(n, "#4daf4a" if n.startswith("decode") else "#e07b39")
                                            for n in names])
        ax.bar_label(bars, fontsize=7, labels=[f"{v:.0f}\n{report['results'][name][n]['cpu_ms_per_img']:.3g} ms"
                                                for n, v in zip(names, values)])
        ax.set_ylim(0, 1.2 * max(values))
        ax.set_title(textwrap.fill(f"{name}: {report['settings'][name]}", 70), fontsize=8)
        ax.set_ylabel("images / s  (labels: img/s, CPU ms per image)")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle(f"loader throughput, {report['machine']['cores']} cores, {report['machine']['cpu_model']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- main


@functools.cache
def jpeg_files(root: Path, num_jpeg: int, num_classes: int = 10):
    """ImageNet-like JPEG files (300-500 px, quality 90) and their labels."""
    rng = np.random.default_rng(0)
    files, labels = [], class_labels(rng, num_jpeg, num_classes)
    for i, label in enumerate(labels):
        path = root / "jpeg_files" / f"class_{label:02d}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(natural_jpeg(rng))
        files.append(path)
    return files, labels


def jpeg_set(root: Path, args, max_side: int | None = None, num_classes: int = 10):
    """The JPEG files converted with `max_side` (None: the converter's default), and the stored JPEGs as files
    for torch_pil (for the default set: the originals, byte for byte)."""
    files, labels = jpeg_files(root, args.num_jpeg, num_classes)
    name = "jpeg" if max_side is None else f"jpeg_{max_side}"
    options = {} if max_side is None else {"max_side": max_side}
    seconds = []
    for _ in range(2):          # converted twice: the best of two timings
        start = time.perf_counter()
        out = write_dataset(root / name, {"train": {"images": files, "labels": labels}}, num_classes=num_classes,
                            encoding="jpeg", formats=formats(), workers=args.workers, overwrite=True,
                            normalization=PAPER_NORMALIZATION["imagenet_lt"], **options)
        seconds.append(time.perf_counter() - start)
    ds = DatasetDir(out)
    reader = ShardReader(ds.split("train").dali_dir)
    stored = [reader.image_bytes(p) for p in range(len(reader))]
    stored_files = []
    for p, (data, label) in enumerate(zip(stored, labels)):
        path = root / f"{name}_files" / f"class_{label:02d}" / f"img_{p:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.tobytes())
        stored_files.append(path)
    pixels = np.mean([np.prod(Image.open(f).size) for f in stored_files])
    info = {"max_side": ds.image["max_side"], "stored": ds.manifest["splits"]["train"]["stored"],
            "original_kb_per_image": round(float(np.mean([f.stat().st_size for f in files])) / 1e3, 1),
            "stored_kb_per_image": round(float(np.mean([len(d) for d in stored])) / 1e3, 1),
            "stored_kpixels_per_image": round(float(pixels) / 1e3, 1),
            "convert_img_per_s": round(len(files) / min(seconds), 1), "convert_formats": "+".join(formats())}
    setting = (f"{args.num_jpeg} JPEGs 300-500 px, stored with max_side {ds.image['max_side']} "
               f"({info['stored_kb_per_image']:.0f} KB, {info['stored_kpixels_per_image']:.0f} kpx per image), "
               f"RRC {args.size} + flip, batch {args.batch_size}")
    torch_dataset = JpegFolder(stored_files, labels, args.size, ds.mean, ds.std)
    return (ds, torch_dataset, [augment.large_train(args.size)], args.size), setting, info


def raw_set(root: Path, args, num_classes: int = 10):
    """32 x 32 x 3 random pixels, stored raw."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (args.num_raw, 32, 32, 3), dtype=np.uint8)
    labels = class_labels(rng, args.num_raw, num_classes)
    ds = DatasetDir(write_dataset(root / "raw", {"train": {"images": images, "labels": labels}},
                                  num_classes=num_classes, encoding="raw", formats=formats()))
    setting = f"{args.num_raw} raw 32x32x3, pad 4 + crop + flip, batch {args.batch_size}"
    return (ds, RawArray(images, labels, ds.mean, ds.std), [augment.small_train()], None), setting, {}


SETS = {"jpeg": jpeg_set, "jpeg_256": functools.partial(jpeg_set, max_side=256), "raw": raw_set}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/loader_throughput.json")
    p.add_argument("--num-jpeg", type=int, default=1024)
    p.add_argument("--num-raw", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds, loaders interleaved")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--size", type=int, default=224, help="RandomResizedCrop output side (jpeg sets)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--sets", default="jpeg,jpeg_256,raw",
                   help="jpeg: the converter's default storage; jpeg_256: --max-side 256; raw: 32 px pixels")
    p.add_argument("--loaders", default=",".join(["torch_pil", "ffcv_raw", *(f"fasttrain_{k}" for k in KINDS),
                                                  *(f"decode_{d}" for d in DECODERS)]),
                   help="which of torch_pil, ffcv_raw, fasttrain_<kind>, decode_<pil|ffcv|dali> to time")
    p.add_argument("--device", default="cpu", help="where fasttrain loaders put their batches (e.g. cuda)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_info(), "settings": {}, "stored": {}, "results": {}, "acceptance": {}}
    names = args.sets.split(",")
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        built = {}
        for name in names:
            built[name], report["settings"][name], info = SETS[name](Path(tmp), args)
            if info:
                report["stored"][name] = info
        jpeg = {name: spec for name, spec in built.items() if name != "raw"}   # interleaved with each other
        groups = [jpeg] + ([{"raw": built["raw"]}] if "raw" in built else [])
        for group in groups:
            if group:
                report["results"].update(run_sets(group, args))
        for name in names:
            report["acceptance"][name] = acceptance(report["results"][name])
    report["settings"].update(workers=args.workers, device=args.device, warmup_epochs=1, rounds=args.rounds,
                              epochs_per_round=args.epochs, img_per_s="best round", cpu_ms_per_img="median round",
                              load_average_at_end=os.getloadavg()[0])
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out.with_suffix(".png"))
    print(json.dumps(report["acceptance"], indent=1))
    return report


if __name__ == "__main__":
    main()
