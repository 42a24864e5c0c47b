"""Training throughput with the real loaders against the same model fed pre-loaded tensors, in one run.

ResNet-32 on 32 px raw data (CIFAR-sized). For each loader the engine's own `train_epoch` is timed; the
reference swaps the loader for a list of ready batches already on the device (the upper bound a loader
can reach). Epochs with the loader and pre-loaded alternate; the best of each counts. Bar: every loader
reaches at least 90% of the pre-loaded rate.

    python benchmarks/train_throughput.py [--out benchmarks/results/train_throughput.json]
    python benchmarks/train_throughput.py --arch resnet50 --image-size 160 --precision bf16 --channels-last  # GPU
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from common import labels as class_labels
from common import formats, machine_info, save_bar_plot, synchronize  # noqa: E402  (benchmarks/common.py)

from fasttrain.config import Config
from fasttrain.engine import Engine


class Preloaded:
    """Stands in for a loader: the same batches, already made, replayed each epoch."""

    def __init__(self, batches):
        self.batches = batches

    def set_epoch(self, epoch, first_batch=0):
        pass

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def make_dataset(root: Path, n: int, size: int, encoding: str, test_images: int = 256) -> Path:
    """`n` training images (raw size x size x 3, or ImageNet-like JPEGs) and a test split of `test_images`
    (repeating the training images where it is larger)."""
    from data_prep.convert import write_dataset
    rng = np.random.default_rng(0)
    labels = class_labels(rng, n)
    if encoding == "raw":
        images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    else:
        from common import natural_image
        images = [natural_image(rng) for _ in range(n)]
    test = np.arange(test_images) % n
    test_split = {"images": images[test] if encoding == "raw" else [images[i] for i in test], "labels": labels[test]}
    return write_dataset(root / f"bench_{encoding}", {"train": {"images": images, "labels": labels},
                                                       "test": test_split},
                         num_classes=10, encoding=encoding, shard_size=1000, formats=formats())


def images_per_second(engine: Engine, epoch: int) -> float:
    synchronize(engine.device)
    t0 = time.perf_counter()
    engine.train_epoch(epoch)
    synchronize(engine.device)
    return len(engine.train_loader) * engine.per_process_batch / (time.perf_counter() - t0)


def compare(engine: Engine, rounds: int) -> tuple[float, float]:
    """Best epoch rate with the real loader and with the same batches pre-loaded, the two alternating
    epoch by epoch so that drifting machine load hits both alike."""
    real = engine.train_loader
    real.set_epoch(0)
    preloaded = Preloaded(list(real))
    rates = {"real": [], "preloaded": []}
    for r in range(rounds + 1):                 # round 0 warms up (allocator, caches, compilation)
        for name, loader in (("real", real), ("preloaded", preloaded)):
            engine.train_loader = loader
            rate = images_per_second(engine, r)
            if r:
                rates[name].append(rate)
    return max(rates["real"]), max(rates["preloaded"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/train_throughput.json")
    p.add_argument("--arch", default="resnet32")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--image-size", type=int, default=32, help="32: raw CIFAR-like set; larger: jpeg set + RRC")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="timed epochs per side (best one counts)")
    p.add_argument("--loaders", default="device,ffcv,dali,torch")
    p.add_argument("--precision", default="no")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--test-images", type=int, default=256)
    p.add_argument("--time-eval", action="store_true", help="also time one evaluation of the test split")
    args = p.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        encoding = "raw" if args.image_size <= 64 else "jpeg"
        data = make_dataset(Path(tmp), args.images, args.image_size, encoding, args.test_images)
        for loader in args.loaders.split(","):
            cfg = Config(data=str(data), out=str(Path(tmp) / f"run_{loader}"), arch=args.arch, epochs=100,
                         batch_size=args.batch_size, lr=0.05, schedule="constant", loader=loader,
                         image_size=args.image_size, precision=args.precision, channels_last=args.channels_last,
                         log_every=10_000)
            engine = Engine(cfg)
            real, preloaded = compare(engine, args.rounds)
            results[loader] = {"images_per_s": real, "preloaded_images_per_s": preloaded,
                               "ratio": real / preloaded, "train_images": len(engine.train_loader) * args.batch_size}
            if args.time_eval:
                engine.evaluate(0)                                # warm-up: shapes of the last batch
                synchronize(engine.device)
                t0 = time.perf_counter()
                engine.evaluate(1)
                synchronize(engine.device)
                results[loader].update(eval_seconds=time.perf_counter() - t0, eval_images=args.test_images)
            print(f"{loader:>7}: {real:8.1f} img/s with the loader, {preloaded:8.1f} pre-loaded "
                  f"-> {100 * real / preloaded:.1f}%", flush=True)
            del engine
            from accelerate.state import AcceleratorState, GradientState
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()

    report = {"benchmark": "train_throughput", "machine": machine_info(), "settings": vars(args),
              "results": results, "bar": "every loader >= 90% of pre-loaded",
              "bar_met": all(r["ratio"] >= 0.9 for r in results.values())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    save_bar_plot({f"{k}\n(pre-loaded)": v["preloaded_images_per_s"] for k, v in results.items()}
                  | {k: v["images_per_s"] for k, v in results.items()},
                  out.with_suffix(".png"), f"{args.arch} training, {args.image_size}px, images/s")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
