"""Training throughput of MoCo v2 and self-training with each loader, through the engine's own `train_epoch`.

A raw 32 px set (CIFAR-sized) with a labeled and an unlabeled split; ResNet-32 at half width by default.
MoCo: images per second per view (each image gives two views; shuffling BN over 8 sub-batches on one
device). Self-training: the joint stage, a supervised run on the derived labeled + pseudo-labeled dataset
that fasttrain.pseudo_label writes (the pseudo-labels are random, which does not change the cost); the
writing of that dataset is timed too. One warm-up epoch, then `--epochs` timed.
Defaults are sized for about 3 minutes on 2 CPU cores; on a GPU raise --images / --batch-size.

    python benchmarks/ssl_throughput.py --out benchmarks/results/ssl_throughput.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from common import formats, labels, machine_info, save_bar_plot, synchronize  # noqa: E402  (benchmarks/common.py)

from fasttrain.config import Config
from fasttrain.engine import Engine


def make_dataset(root: Path, n: int, size: int) -> Path:
    from data_prep.convert import write_dataset
    rng = np.random.default_rng(0)
    split = lambda offset: {"images": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),  # noqa: E731
                            "labels": labels(rng, n), "source_index": offset + np.arange(n)}
    return write_dataset(root / "bench_ssl", {"train": split(0), "unlabeled": split(n), "test": split(2 * n)},
                         num_classes=10, encoding="raw", shard_size=1000, formats=formats())


def joint_dataset(tmp: Path, data: Path) -> tuple[Path, float]:
    """The derived labeled + pseudo-labeled dataset (random pseudo-labels) and the seconds it took to write."""
    from fasttrain.dataset import DatasetDir
    from fasttrain.pseudo_label import write_pseudo_dataset
    split = DatasetDir(data).split("unlabeled")
    rng = np.random.default_rng(1)
    np.savez(tmp / "p.npz", position=np.arange(split.num_samples), source_index=split.source_index,
             label=rng.integers(0, 10, split.num_samples), confidence=rng.random(split.num_samples, np.float32),
             threshold=np.float32(0))
    t0 = time.perf_counter()
    out = write_pseudo_dataset(data, tmp / "p.npz", tmp / "joint")
    return out, time.perf_counter() - t0


def images_per_second(engine: Engine, epochs: int) -> float:
    """Images per second per view over `epochs` timed epochs, after one warm-up epoch."""
    engine.train_epoch(0)
    synchronize(engine.device)
    t0 = time.perf_counter()
    for e in range(1, epochs + 1):
        engine.train_epoch(e)
    synchronize(engine.device)
    steps = epochs * len(engine.train_loader)
    return steps * engine.per_process_batch * engine.accelerator.num_processes / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/ssl_throughput.json")
    p.add_argument("--arch", default="resnet32")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--images", type=int, default=512, help="per split (labeled and unlabeled)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--loaders", default="ffcv,dali,torch,device")
    p.add_argument("--methods", default="moco,self_training")
    p.add_argument("--precision", default="no")
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args()

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp), args.images, args.image_size)
        joint, write_seconds = joint_dataset(Path(tmp), data)
        print(f"wrote the joint dataset ({2 * args.images} images) in {write_seconds:.2f} s", flush=True)
        per_method = {"moco": dict(method="moco", moco_queue=4096, moco_shuffle_groups=8),
                      "self_training": dict(method="supervised", data=str(joint))}
        for method in args.methods.split(","):
            for loader in args.loaders.split(","):
                cfg = Config(data=str(data), out=str(Path(tmp) / f"run_{method}_{loader}"), arch=args.arch,
                             width=args.width, epochs=100, batch_size=args.batch_size, lr=0.05, schedule="constant",
                             loader=loader, precision=args.precision, channels_last=args.channels_last,
                             log_every=10_000).update(per_method[method])
                engine = Engine(cfg)
                rate = images_per_second(engine, args.epochs)
                results.setdefault(method, {})[loader] = {"images_per_s_per_view": rate,
                                                          "steps_per_epoch": len(engine.train_loader)}
                print(f"{method:>13} {loader:>6}: {rate:8.1f} img/s per view", flush=True)
                del engine
                from accelerate.state import AcceleratorState, GradientState
                AcceleratorState._reset_state(reset_partial_state=True)
                GradientState._reset_state()

    report = {"benchmark": "ssl_throughput", "machine": machine_info(), "settings": vars(args),
              "results": results, "joint_dataset_write_seconds": write_seconds,
              "note": "shared machine: timings are approximate"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    bars = {f"{m}\n{l}": r["images_per_s_per_view"] for m, by in results.items() for l, r in by.items()}
    save_bar_plot(bars, out.with_suffix(".png"),
                  f"{args.arch} x{args.width}, {args.image_size}px: training images/s per view")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
