"""Scale rehearsal: the ImageNet-LT / iNaturalist 2018 path at the real class counts, on the CPU.

    python benchmarks/scale_rehearsal.py [--work DIR] [--out benchmarks/results/scale_rehearsal.json]
    make rehearsal

Synthetic source trees (`benchmarks/scale_trees.py`) laid out like the real datasets: ImageNet-LT-shaped
(1,000 classes, the real 20,000-line val and 50,000-line test lists) and iNaturalist-2018-shaped (8,142
classes, the real 24,426-line val list), each with a long-tailed train list at the real class count and few
images per class (the real profile divided by --scale-*); and for each a 10-class reference with the same
number of images in every split and the same image size. For each tree, every stage runs as its own process,
as a user would run it:

  convert       python -m data_prep.convert --source imagenet_lt|inat2018 (the source's defaults)
  train+resume  recipes/supervised_{imagenet_lt,inat}.py for one epoch (the class count is rehearsed, not the
                network: ResNet-32 x0.5 at 32 px, fp32, constant lr), SIGTERM half-way through the epoch (a
                preemption: the run checkpoints at its step, exit 75), then the same command with --resume,
                which finishes the epoch, selects on val and reports on test (iNat: val)
  crt           recipes/crt_{imagenet_lt,inat}.py, one epoch, class-aware sampler, from backbone_best.pt
  evaluate      python -m fasttrain.evaluate on the report split
  report        python -m fasttrain.report over the train and cRT runs

Recorded per stage: wall seconds, peak RSS of the stage's process tree (loader workers included), the images
it handled, milliseconds per image and, against its reference's same stage, the per-image cost ratio (target:
<= 1.5x); every file a stage writes with its size and its growth exponent with the class count,
log(size / reference's size) / log(C / 10) (a dense C x C file has exponent 2, one entry per class 1; target:
< 1.5). Shot thresholds are divided by the same factor as the class sizes (at least 2). Timings are wall clock
on whatever else the machine runs (`machine.load_average_at_start`, `load_average_at_end`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from common import machine_info  # noqa: E402  (benchmarks/common.py; puts the repo on sys.path)

import scale_trees  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
# The rehearsed network and input: small enough for 2 CPU cores, the classifier the only part that grows with C.
BATCH = 128
MODEL = ["--arch", "resnet32", "--width", "0.5", "--image-size", "32", "--eval-size", "32", "--precision", "no",
         "--batch-size", str(BATCH),
         "--channels-last", "false", "--epochs", "1", "--schedule", "constant", "--log-every", "10"]
PROGRESS = re.compile(r"epoch 1/1:.*?(\d+)/(\d+) \[")
STOPPED = re.compile(r"stopped at epoch (\d+) \(step (\d+)\), batch (\d+) of (\d+)")
RESUMED = re.compile(r"resumed \S+ at epoch (\d+) \(step (\d+)\)")
RECIPES = {"imagenet_lt": ("supervised_imagenet_lt.py", "crt_imagenet_lt.py"),
           "inat2018": ("supervised_inat.py", "crt_inat.py")}


# ------------------------------------------------------------------------------------------------ processes
def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_stage(cmd: list[str], log: Path, *, interrupt_at: float | None = None, expect: int = 0) -> dict:
    """Run `cmd` (its output to `log`); peak RSS of its process tree sampled every 50 ms. With `interrupt_at`,
    SIGTERM goes to the process once its progress bar shows that fraction of the epoch done."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        watched, peak, sent = psutil.Process(proc.pid), 0, False
        while proc.poll() is None:
            peak = max(peak, _tree_rss(watched))
            if interrupt_at is not None and not sent:
                bars = PROGRESS.findall(log.read_text(errors="replace"))
                if bars and int(bars[-1][0]) >= interrupt_at * int(bars[-1][1]):
                    proc.send_signal(signal.SIGTERM)
                    sent = True
            time.sleep(0.05)
    seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    if proc.returncode != expect:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode} (expected {expect}); see {log}:\n{text[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(peak / 2 ** 20, 1), "exit_code": proc.returncode,
            "log": str(log)}


def files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ one shape
def rehearse(name: str, tree: dict, source: str, recipes: str, classes: int, scale: float, work: Path,
             workers: int) -> dict:
    """All stages on one tree (`source`: how it is converted; `recipes`: imagenet_lt or inat2018, the recipes
    it is trained with)."""
    data, runs, logs = work / f"{name}_data", work / f"{name}_runs", work / "logs"
    for d in (data, runs):
        shutil.rmtree(d, ignore_errors=True)
    runs.mkdir(parents=True)
    logs.mkdir(exist_ok=True)
    stages, counts = {}, tree["counts"]
    report_split = "test" if counts["test"] else "val"
    eval_images = counts["val"] + (counts["test"] if counts["test"] else 0)   # selection on val, report on test

    convert = [PY, "-m", "data_prep.convert", "--source", source, "--root", tree["root"], "--out", str(data),
               "--split-file", tree["train_list"], "--val-split-file", tree["val_list"], "--workers", str(workers)]
    if tree["test_list"]:
        convert += ["--test-split-file", tree["test_list"]]
    if classes != scale_trees.SHAPES[source].num_classes:
        convert += ["--num-classes", str(classes)]
    stages["convert"] = run_stage(convert, logs / f"{name}_convert.log") | {
        "images": sum(counts.values()), "files": files_under(data)}

    train_recipe, crt_recipe = (str(REPO / "recipes" / r) for r in RECIPES[recipes])
    shots = ["--many-threshold", str(max(2, round(100 / scale))), "--few-threshold", str(max(2, round(20 / scale))),
             "--workers", str(workers)]
    run = runs / "train"
    train = [PY, train_recipe, "--data", str(data), "--out", str(run), *MODEL, *shots]
    # A preemption half-way through the epoch: the run checkpoints at its step and exits 75; the same
    # command with --resume finishes the epoch, selects on val and reports.
    stages["train"] = run_stage(train, logs / f"{name}_train.log", interrupt_at=0.5, expect=75)
    stages["resume"] = run_stage([PY, train_recipe, "--resume", str(run)], logs / f"{name}_resume.log")
    stopped = STOPPED.search(Path(stages["train"]["log"]).read_text(errors="replace"))
    resumed = RESUMED.search(Path(stages["resume"]["log"]).read_text(errors="replace"))
    stages["train"]["stopped_at"] = dict(zip(("epoch", "step", "batch", "batches"), map(int, stopped.groups())))
    stages["resume"]["resumed_at"] = dict(zip(("epoch", "step"), map(int, resumed.groups())))
    train_images = counts["train"] // BATCH * BATCH
    stages["train+resume"] = {"seconds": round(stages["train"]["seconds"] + stages["resume"]["seconds"], 2),
                              "peak_rss_mib": max(stages["train"]["peak_rss_mib"], stages["resume"]["peak_rss_mib"]),
                              "images": train_images + eval_images, "files": files_under(run)}

    crt_run = runs / "crt"
    crt = [PY, crt_recipe, "--data", str(data), "--out", str(crt_run), "--pretrained", str(run / "backbone_best.pt"),
           *MODEL, *shots]
    stages["crt"] = run_stage(crt, logs / f"{name}_crt.log") | {"images": train_images + eval_images,
                                                               "files": files_under(crt_run)}
    ev_out = runs / "eval"
    stages["evaluate"] = run_stage([PY, "-m", "fasttrain.evaluate", "--data", str(data), "--checkpoint",
                                    str(run / "model.pt"), "--split", report_split, "--workers", str(workers),
                                    "--out", str(ev_out)], logs / f"{name}_evaluate.log") | {
        "images": counts[report_split], "files": files_under(ev_out)}
    report_dir = runs / "report"
    report_dir.mkdir()
    stages["report"] = run_stage([PY, "-m", "fasttrain.report", str(run), str(crt_run), "--out",
                                  str(report_dir / "results.md"), "--plot", str(report_dir / "groups.png")],
                                 logs / f"{name}_report.log") | {"images": None, "files": files_under(report_dir)}
    for stage in stages.values():
        if stage.get("images"):
            stage["ms_per_image"] = round(1000 * stage["seconds"] / stage["images"], 4)
    metrics = json.loads((run / "metrics.json").read_text())
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"classes": classes, "scale": scale, "images": counts, "train_class_counts": {
                "max": max(tree["train_class_counts"]), "min": min(tree["train_class_counts"])},
            "stages": stages, "train_images_per_s": jsonl[-1].get("train_images_per_s"),
            "top1": {"train_run_final": metrics.get("top1"), "split": metrics.get("split")}}


# ------------------------------------------------------------------------------------------------ comparison
def compare(result: dict, reference: dict) -> dict:
    """Per stage: per-image cost ratio against the reference; per file: growth exponent with C."""
    out, c, c0 = {}, result["classes"], reference["classes"]
    for stage in ("convert", "train+resume", "crt", "evaluate", "report"):
        s, r = result["stages"][stage], reference["stages"][stage]
        entry = ({"per_image_ratio": round(s["ms_per_image"] / r["ms_per_image"], 3)} if s.get("ms_per_image")
                 else {"seconds_ratio": round(s["seconds"] / r["seconds"], 3)})
        exponents = {f: round(math.log(max(size, 1) / r["files"][f]) / math.log(c / c0), 3)
                     for f, size in s["files"].items() if r["files"].get(f)}
        entry["largest_file"] = max(s["files"].items(), key=lambda kv: kv[1])
        worst = max(exponents, key=exponents.get)
        entry["max_growth_exponent"] = {"file": worst, "exponent": exponents[worst]}
        out[stage] = entry
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shapes = list(results["comparison"])
    stages = [s for s in ("convert", "train+resume", "crt", "evaluate", "report")]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(shapes)
    for i, shape in enumerate(shapes):
        comp = results["comparison"][shape]
        values = [comp[s].get("per_image_ratio", comp[s].get("seconds_ratio", np.nan)) for s in stages]
        bars = ax.bar(np.arange(len(stages)) + i * width, values, width,
                      label=f"{shape} ({results['shapes'][shape]['classes']:,} classes)")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1.5, color="red", ls="--", lw=1, label="target 1.5x")
    ax.set_xticks(np.arange(len(stages)) + width * (len(shapes) - 1) / 2, stages)
    ax.set_ylabel("cost per image / 10-class run's")
    ax.set_title("Scale rehearsal (CPU): per-image cost against a 10-class run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/fasttrain-scale-rehearsal"),
                   help="scratch directory for the trees, datasets and runs (removed first)")
    p.add_argument("--scale-imagenet", type=float, default=32, help="ImageNet-LT class sizes divided by this")
    p.add_argument("--scale-inat", type=float, default=100, help="iNaturalist 2018 class sizes divided by this")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--keep", action="store_true", help="keep --work afterwards")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale_rehearsal.json")
    args = p.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    results = {"machine": machine_info(), "settings": {
        "model": MODEL, "scale_imagenet": args.scale_imagenet, "scale_inat": args.scale_inat,
        "workers": args.workers, "image": "36x48 JPEG (quality 90)"}, "shapes": {}, "trees": {}}
    t0 = time.perf_counter()
    trees, plan = {}, []
    for name, scale in (("imagenet_lt", args.scale_imagenet), ("inat2018", args.scale_inat)):
        shape, ref = scale_trees.SHAPES[name], f"reference10_{name}"
        start = time.perf_counter()
        trees[name] = scale_trees.build(args.work / f"{name}_tree", shape, scale=scale)
        trees[ref] = scale_trees.build_reference(args.work / f"{ref}_tree", trees[name])
        results["trees"][name] = {"seconds": round(time.perf_counter() - start, 1), **trees[name]["counts"]}
        plan += [(ref, "imagenet_lt", name, 10, scale), (name, shape.source, name, shape.num_classes, scale)]
    for name, source, recipes, classes, scale in plan:
        print(f"[rehearsal] {name}: {classes} classes, {trees[name]['counts']}", flush=True)
        results["shapes"][name] = rehearse(name, trees[name], source, recipes, classes, scale, args.work,
                                           args.workers)
    results["comparison"] = {name: compare(results["shapes"][name], results["shapes"][f"reference10_{name}"])
                             for name in ("imagenet_lt", "inat2018")}
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    results["load_average_at_end"] = os.getloadavg()[0]
    ratios = [v for comp in results["comparison"].values() for s in comp.values()
              for k, v in s.items() if k == "per_image_ratio"]
    exponents = [s["max_growth_exponent"]["exponent"] for comp in results["comparison"].values()
                 for s in comp.values() if "max_growth_exponent" in s]
    results["verdicts"] = {"max_per_image_ratio": max(ratios), "per_image_ratio_ok": max(ratios) <= 1.5,
                           "max_growth_exponent": max(exponents), "no_c_squared_file": max(exponents) < 1.5}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps({"comparison": results["comparison"], "verdicts": results["verdicts"],
                      "total_seconds": results["total_seconds"]}, indent=2))


if __name__ == "__main__":
    main()
