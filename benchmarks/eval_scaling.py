"""Evaluation cost per image against the number of classes: the ImageNet-LT shape (1,000 classes), the
iNaturalist 2018 shape (8,142) and a 10-class run, with the same backbone, image size and eval images.

Each shape is the engine's own evaluation path: `fasttrain.evaluate.evaluate` (forward, top-1 / top-5
bookkeeping, gather, metrics) followed by `write_report` (metrics.json, confusion.npz, per_class.png).
What legitimately grows with C is the classifier (feature_dim x C multiply-adds per image) and the top-k
over C logits; everything else should not. So the comparison is stated as:
  - `forward`: the model alone on the same batches (backbone + fc), the floor for each shape;
  - `evaluate`: the whole evaluation; `report`: write_report; per image = (evaluate + report) / images;
  - `dense_reference`: what a dense confusion matrix adds per evaluation at that C (a C x C int64 matrix
    allocated, filled, read back, summed, saved as .npy), timed on the same (label, prediction) pairs.
The per-evaluation costs (report, metrics) are spread over `--images` images, far fewer than a real eval split
(ImageNet-LT val 20,000 / test 50,000, iNat val 24,426), so the ratio measured here is an upper bound.
Shapes alternate round by round; the best round of each counts. Times are CPU seconds of this process by default
on a CPU (`--clock cpu`: user + system time, which other jobs on a shared machine barely move; one torch thread)
and wall seconds on a GPU (`--clock wall`); both are recorded. Target: iNat-shape evaluation per image
within 1.3x of the ImageNet-LT shape's, and no written file growing with C squared.

    python benchmarks/eval_scaling.py [--out benchmarks/results/eval_scaling.json]

Reusable: `time_evaluation(model, loader, num_classes, train_counts, out_dir)` times one evaluation + report
(wall and CPU seconds) and lists the files it wrote with their sizes.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import machine_info, save_bar_plot, synchronize  # noqa: E402  (benchmarks/common.py)

from data_prep.longtail import exp_profile
from fasttrain.confusion import Confusion
from fasttrain.data.batch import Batch
from fasttrain.evaluate import evaluate, write_report
from fasttrain.models import build_model

# name: (classes, largest train class, smallest) - exp long-tail profiles of the real sets' extremes
SHAPES = {"10 classes": (10, 500, 5), "ImageNet-LT shape": (1000, 1280, 5), "iNat 2018 shape": (8142, 1000, 2)}


class Batches:
    """Stands in for an eval loader: the same ready batches, every image once."""

    def __init__(self, batches):
        self.batches = batches

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def clocks() -> np.ndarray:
    """(wall, CPU) seconds now."""
    return np.array([time.perf_counter(), time.process_time()])


def time_evaluation(model, loader, num_classes: int, train_counts, out_dir: Path, *, split: str = "val") -> dict:
    """Wall and CPU seconds of one `evaluate` and one `write_report` into `out_dir`, and the bytes of each file
    written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    synchronize(device)
    t0 = clocks()
    metrics, confusion = evaluate(model, loader, num_classes, train_counts)
    t1 = clocks()
    write_report(out_dir, metrics | {"epoch": 0, "split": split}, confusion, train_counts, epochs=1)
    t2 = clocks()
    (evaluate_s, evaluate_cpu_s), (report_s, report_cpu_s) = t1 - t0, t2 - t1
    return {"evaluate_s": evaluate_s, "evaluate_cpu_s": evaluate_cpu_s, "report_s": report_s,
            "report_cpu_s": report_cpu_s, "images": metrics["num_eval_images"],
            "files": {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}}


@torch.no_grad()
def time_forward(model, loader) -> np.ndarray:
    """(wall, CPU) seconds of the model alone on the loader's batches."""
    device = next(model.parameters()).device
    synchronize(device)
    t0 = clocks()
    for batch in loader:
        model(batch.images)
    synchronize(device)
    return clocks() - t0


def time_dense_reference(labels: np.ndarray, predictions: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    """(wall, CPU) seconds of a dense confusion matrix's per-evaluation work: an int64 C x C matrix filled with
    the pairs, read back, its row sums and diagonal, and np.save."""
    t0 = clocks()
    dense = torch.zeros(num_classes, num_classes, dtype=torch.long)
    pairs = (torch.from_numpy(labels), torch.from_numpy(predictions))
    dense.index_put_(pairs, torch.ones(len(labels), dtype=torch.long), accumulate=True)
    matrix = dense.numpy()
    matrix.sum(1), np.diag(matrix)
    np.save(path, matrix)
    seconds = clocks() - t0
    path.unlink()
    return seconds


def multiply_adds(model, image_size: int) -> dict:
    """Multiply-adds per image of the convolutions (backbone) and of the fc layer, counted with hooks."""
    counts = {"backbone": 0, "fc": 0}

    def conv(m, inp, out):
        counts["backbone"] += out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inp, out):
        counts["fc"] += m.in_features * m.out_features

    hooks = [m.register_forward_hook(conv) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks.append(model.fc.register_forward_hook(linear))
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    for h in hooks:
        h.remove()
    return counts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/eval_scaling.json")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--images", type=int, default=512, help="eval images per evaluation (every shape)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per shape (best one counts)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clock", choices=("cpu", "wall"), default=None,
                   help="what the ratios use (default: cpu on a CPU device, wall on a GPU)")
    args = p.parse_args()
    args.clock = args.clock or ("cpu" if args.device == "cpu" else "wall")
    cpu = args.clock == "cpu"
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.standard_normal((args.images, 3, args.image_size, args.image_size),
                                                  dtype=np.float32)).to(device)
    shapes = {}
    for name, (classes, largest, smallest) in SHAPES.items():
        torch.manual_seed(0)                       # the same backbone weights for every shape
        model = build_model(args.arch, classes).to(device).eval()
        labels = torch.from_numpy(rng.permutation(np.arange(args.images) % classes)).to(device)
        batches = [Batch((images[i:i + args.batch_size],), labels[i:i + args.batch_size],
                         torch.arange(i, min(i + args.batch_size, args.images), device=device))
                   for i in range(0, args.images, args.batch_size)]
        shapes[name] = {"classes": classes, "model": model, "loader": Batches(batches),
                        "counts": np.round(exp_profile(classes, largest, largest / smallest)).astype(int), "macs": multiply_adds(model, args.image_size)}
    with tempfile.TemporaryDirectory() as tmp:                 # warm-up: allocator, kernels, matplotlib's fonts
        for name, s in shapes.items():
            time_evaluation(s["model"], Batches(s["loader"].batches[:1]), s["classes"], s["counts"], Path(tmp) / name)

    kinds = ("forward", "evaluate", "report", "dense_reference")
    timings = {name: {f"{k}{c}_s": [] for k in kinds for c in ("", "_cpu")} for name in shapes}
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, s in shapes.items():
                out_dir = Path(tmp) / f"{s['classes']}_{r}"
                t = time_evaluation(s["model"], s["loader"], s["classes"], s["counts"], out_dir)
                files[name] = t["files"]
                pairs = Confusion.load(out_dir / "confusion.npz")
                labels, predictions = np.repeat(pairs.rows, pairs.counts), np.repeat(pairs.cols, pairs.counts)
                measured = {"evaluate": (t["evaluate_s"], t["evaluate_cpu_s"]),
                            "report": (t["report_s"], t["report_cpu_s"]),
                            "forward": time_forward(s["model"], s["loader"]),
                            "dense_reference": time_dense_reference(labels, predictions, s["classes"],
                                                                    Path(tmp) / "dense.npy")}
                for k, (wall, cpu_s) in measured.items():
                    timings[name][f"{k}_s"].append(float(wall))
                    timings[name][f"{k}_cpu_s"].append(float(cpu_s))
                print(f"round {r + 1}/{args.rounds} {name:>18} ({args.clock} s): " + ", ".join(
                    f"{k} {v[1 if cpu else 0]:.2f}" for k, v in measured.items()), flush=True)

    results = {}
    for name, s in shapes.items():
        best = {k: min(v) for k, v in timings[name].items()}
        clock = {k: best[f"{k}_cpu_s" if cpu else f"{k}_s"] for k in kinds}
        n = args.images
        results[name] = {
            "classes": s["classes"],
            "train_counts": {"largest": int(s["counts"].max()), "smallest": int(s["counts"].min())},
            "multiply_adds_per_image": s["macs"],
            "fc_share_of_multiply_adds": s["macs"]["fc"] / sum(s["macs"].values()),
            **{k: round(v, 4) for k, v in best.items()}, "all_rounds": timings[name],
            "ms_per_image": {"evaluate_and_report": 1000 * (clock["evaluate"] + clock["report"]) / n,
                             "forward": 1000 * clock["forward"] / n,
                             "bookkeeping (evaluate - forward)": 1000 * (clock["evaluate"] - clock["forward"]) / n,
                             "report": 1000 * clock["report"] / n,
                             "dense_reference": 1000 * clock["dense_reference"] / n},
            "files_bytes": files[name]}
    base, inat = results["ImageNet-LT shape"]["ms_per_image"], results["iNat 2018 shape"]["ms_per_image"]
    ratio = inat["evaluate_and_report"] / base["evaluate_and_report"]
    ratios = {"inat_over_imagenet_lt": ratio,
              "inat_over_imagenet_lt_forward_only": inat["forward"] / base["forward"],
              "inat_over_10_classes": inat["evaluate_and_report"] / results["10 classes"]["ms_per_image"][
                  "evaluate_and_report"],
              "inat_over_imagenet_lt_with_dense_reference": (inat["evaluate_and_report"] + inat["dense_reference"])
              / (base["evaluate_and_report"] + base["dense_reference"])}
    sizes = {f: {name: r["files_bytes"].get(f) for name, r in results.items()} for f in files["iNat 2018 shape"]}
    report = {"benchmark": "eval_scaling", "machine": machine_info(), "settings": vars(args),
              "ms_per_image_clock": f"{args.clock} seconds, best of {args.rounds} rounds", "results": results,
              "ratios": ratios, "file_bytes_by_shape": sizes,
              "target": "iNat-shape evaluate + report per image <= 1.3x the ImageNet-LT shape's; files linear: "
                        "confusion.npz <= 24 B x images + 4 KiB, metrics.json <= 64 B x classes + 8 KiB",
              "target_met": ratio <= 1.3 and all(
                  r["files_bytes"]["confusion.npz"] <= 24 * args.images + 4096
                  and r["files_bytes"]["metrics.json"] <= 64 * r["classes"] + 8192 for r in results.values())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    labels = {name: name.replace(" shape", f"\n{r['classes']} classes") for name, r in results.items()}
    save_bar_plot({labels[name]: 1000 / r["ms_per_image"]["evaluate_and_report"] for name, r in results.items()},
                  out.with_suffix(".png"),
                  f"evaluate + report, {args.arch} {args.image_size}px, {args.images} images, {args.device}\n"
                  f"(images per {args.clock} second, best of {args.rounds})")
    print(json.dumps(ratios, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
