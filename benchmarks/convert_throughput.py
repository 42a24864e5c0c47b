"""Images per second written by data_prep to each format (FFCV, DALI, both) for ImageNet-like JPEGs.

    python benchmarks/convert_throughput.py [--n 400] [--repeats 3] [--workers N] [--out results/....json]

Generates `--n` photo-like JPEGs (300-500 px sides, ~90 KB: gradients + multi-scale noise) in a temp dir, then
times `write_dataset(..., encoding='jpeg')` from the file paths (decode + resize to --max-side + JPEG encode
in a process pool, then the format writers). Timings are wall-clock and approximate on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import machine_info, natural_image  # noqa: E402  (benchmarks/common.py; puts the repo on sys.path)

from data_prep.convert import write_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=400, help="images to generate")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--max-side", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per format; the best is reported")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "convert_throughput.json")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = []
        for i in range(args.n):
            h, w = rng.integers(300, 501, 2)
            paths.append(tmp / "src" / f"{i:05d}.JPEG")
            paths[-1].parent.mkdir(exist_ok=True)
            Image.fromarray(natural_image(rng)).save(paths[-1], quality=90)
        sizes = [p.stat().st_size for p in paths]
        labels = np.arange(args.n) % 10
        def convert(formats, n):
            split = {"images": [str(p) for p in paths[:n]], "labels": labels[:n]}
            start = time.perf_counter()
            out = write_dataset(tmp / "out", {"train": split}, num_classes=10, encoding="jpeg", formats=formats,
                                max_side=args.max_side, workers=args.workers, overwrite=True)
            return time.perf_counter() - start, sum(f.stat().st_size for f in out.rglob("*") if f.is_file())

        convert(("ffcv", "dali"), 20)  # warm-up: imports (ffcv pulls in torch) and page cache
        results = {}
        for formats in (("ffcv",), ("dali",), ("ffcv", "dali")):
            runs = [convert(formats, args.n) for _ in range(args.repeats)]
            seconds = min(r[0] for r in runs)
            results["+".join(formats)] = {"seconds_best": round(seconds, 3),
                                          "seconds_all": [round(r[0], 3) for r in runs],
                                          "images_per_s": round(args.n / seconds, 1),
                                          "output_mb": round(runs[0][1] / 1e6, 2)}
    report = {"benchmark": "convert_throughput", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "note": "wall-clock, best of --repeats, on a machine shared with other jobs: approximate. Each run includes decode + "
                      "resize + JPEG encode of every image in a process pool, the format writer(s), meta and "
                      "sha256 checksums.",
              "n_images": args.n, "image_px": "300-500 per side",
              "mean_source_kb": round(float(np.mean(sizes)) / 1e3, 1),
              "max_side": args.max_side, "jpeg_quality": 90, "workers": args.workers, "machine": machine_info(),
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
