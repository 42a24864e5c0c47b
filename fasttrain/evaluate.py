"""Evaluation: top-1/top-5, many/medium/few-shot and per-class accuracy, confusion matrix, plot.

Every rank evaluates its own block of the eval split (each image exactly once) and keeps, on the device,
one (true class, top-1 prediction, top-5 hit) triple per image; at the end the triples of all ranks are
gathered once and counted on the host, so the metrics do not depend on the number of processes and nothing
of size C x C exists anywhere (the confusion matrix is kept sparse: fasttrain.confusion).

Files of an evaluation (written by `write_report`; their sizes grow with C and with the eval split, never
with C squared):

    metrics.json    see METRICS_LAYOUT (also stored in the file as "layout")
    confusion.npz   the final evaluation's confusion matrix, sparse (fasttrain.confusion)
    per_class.png   per-class accuracy of the final evaluation's split against the class's training images
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .confusion import Confusion
from .files import atomic_file

METRICS_LAYOUT = (
    "Top level: the final evaluation of `split` (top-1/top-5 and many/medium/few in %, group_sizes, thresholds, "
    "num_eval_images) and the only copies of the two per-class vectors: per_class[c] (accuracy of class c in %, "
    "null for a class without eval images) and train_class_counts[c] (its training images, which define the "
    "shot groups). 'final' and 'best': the rows of the results table (epoch 0-based, split, top-1/top-5, "
    "many/medium/few, label); 'best' (the epoch with the highest top-1 on 'selected_on', evaluated on 'split') "
    "carries its own per_class only when its epoch is not the final one; best_top1 and best_epoch repeat its "
    "top-1 and epoch. confusion.npz: the final evaluation's confusion matrix, sparse (rows, cols, counts, shape).")


@torch.no_grad()
def evaluate(model, loader, num_classes: int, train_counts, accelerator=None, *, many: int = 100,
             few: int = 20) -> tuple[dict, Confusion]:
    """Metrics (see `summarize`) and the sparse confusion matrix of `model` on `loader`'s split, the same on
    every rank. Reads the device once, after the last batch."""
    was_training = model.training
    model.eval()
    loader.set_epoch(0)
    device = next(model.parameters()).device
    k = min(5, num_classes)
    outcomes = []   # per batch: (n, 3) int64 on the device: true class, top-1 prediction, top-5 hit
    for batch in loader:
        logits = model(batch.images).float()
        labels = batch.labels
        hit5 = (logits.topk(k, dim=1).indices == labels[:, None]).any(1)
        outcomes.append(torch.stack([labels, logits.argmax(1), hit5.long()], 1))
    outcomes = torch.cat(outcomes) if outcomes else torch.empty(0, 3, dtype=torch.long, device=device)
    if accelerator is not None and accelerator.num_processes > 1:   # ranks may hold one image more than others
        outcomes = accelerator.gather(accelerator.pad_across_processes(outcomes, dim=0, pad_index=-1))
    model.train(was_training)
    outcomes = outcomes.cpu().numpy()
    outcomes = outcomes[outcomes[:, 0] >= 0]
    confusion = Confusion.from_pairs(outcomes[:, 0], outcomes[:, 1], num_classes)
    return summarize(confusion, int(outcomes[:, 2].sum()), train_counts, many=many, few=few), confusion


def summarize(confusion: Confusion, top5_hits: int, train_counts, *, many: int = 100, few: int = 20) -> dict:
    """Accuracies in percent. Shot groups by training count: many > `many`, few < `few`, else medium;
    a group with no classes (or no eval images) is None."""
    per_class_n = confusion.totals()
    correct = confusion.correct()
    total = int(per_class_n.sum())
    per_class = [float(100 * c / n) if n else None for c, n in zip(correct.tolist(), per_class_n.tolist())]
    counts = np.asarray(train_counts)
    groups = {"many": counts > many, "medium": (counts >= few) & (counts <= many), "few": counts < few}

    def group_acc(mask):
        n = per_class_n[mask].sum()
        return float(100 * correct[mask].sum() / n) if n else None

    return {"top1": float(100 * correct.sum() / total), "top5": float(100 * top5_hits / total),
            **{g: group_acc(m) for g, m in groups.items()},
            "group_sizes": {g: int(m.sum()) for g, m in groups.items()},
            "thresholds": {"many": many, "few": few}, "num_eval_images": total,
            "per_class": per_class, "train_class_counts": [int(c) for c in counts]}


ROW_KEYS = ("epoch", "split", "top1", "top5", "many", "medium", "few")
VECTORS = ("per_class", "train_class_counts")


def write_report(run_dir: Path, metrics: dict, confusion: Confusion, train_counts, class_names=None, *,
                 best: dict | None = None, epochs: int | None = None) -> dict:
    """metrics.json, confusion.npz and per_class.png in `run_dir`, each written under a temporary name and
    renamed. `metrics`: the final evaluation; `best`: the best epoch's evaluation (with "selected_on" and
    "selection_top1"). Layout of metrics.json: METRICS_LAYOUT. Returns what it wrote to metrics.json."""
    run_dir = Path(run_dir)
    report = {"layout": METRICS_LAYOUT} | {k: v for k, v in metrics.items() if k not in VECTORS}
    report["final"] = {k: metrics.get(k) for k in ROW_KEYS} | {"label": _label(metrics, None, epochs)}
    if best is not None:
        report["best"] = ({k: best.get(k) for k in ROW_KEYS} | {"selected_on": best["selected_on"]}
                          | {"selection_top1": best.get("selection_top1"), "label": _label(best, best, epochs)})
        if best.get("epoch") != metrics.get("epoch") or best.get("split") != metrics.get("split"):
            report["best"]["per_class"] = best["per_class"]
        report.update(best_top1=best["top1"], best_epoch=best["epoch"])
    report |= {k: metrics[k] for k in VECTORS}     # last: the long vectors after everything a reader looks at
    with atomic_file(run_dir / "metrics.json") as f:
        f.write(json.dumps(report, indent=2))
    confusion.save(run_dir / "confusion.npz")
    split = metrics.get("split")
    with atomic_file(run_dir / "per_class.png", "wb") as f:
        plot_per_class({"": metrics["per_class"]}, train_counts, f, class_names=class_names, split=split,
                       title=f"{split or 'eval'} accuracy per class, {_label(metrics, None, epochs)}",
                       many=metrics.get("thresholds", {}).get("many", 100),
                       few=metrics.get("thresholds", {}).get("few", 20))
    return report


def _label(block: dict, best: dict | None, epochs: int | None) -> str:
    of = f"/{epochs}" if epochs else ""
    epoch = block.get("epoch")
    where = (f"epoch {epoch + 1}{of}, " if epoch is not None else "") + f"{block.get('split')}"
    if best is None:
        return f"final epoch ({where})"
    if best["selected_on"] == block["split"]:
        return f"best {block['split']} epoch ({where}; as the paper reports)"
    return f"best {best['selected_on']} epoch ({where} at the epoch of the highest {best['selected_on']} top-1)"


def results_table(report: dict) -> str:
    """The end-of-run table of a metrics.json: the final epoch and the best epoch, each labelled."""
    fmt = lambda v: "  n/a" if v is None else f"{v:5.2f}"  # noqa: E731
    rows = [report[k] for k in ("final", "best") if report.get(k)]
    width = max(len(r["label"]) for r in rows)
    lines = [f"{'':{width}}  top-1  top-5   many medium    few"]
    lines += [f"{r['label']:{width}}  {fmt(r['top1'])}  {fmt(r['top5'])}  {fmt(r['many'])}  {fmt(r['medium'])}  "
              f"{fmt(r['few'])}" for r in rows]
    return "\n".join(lines)


def plot_per_class(per_class: dict[str, list], train_counts, path, class_names=None, title=None, *,
                   split: str | None = None, many: int = 100, few: int = 20) -> None:
    """Per-class accuracy on `split` against the number of training images of the class (log scale), one
    series per run, with the shot-group boundaries (few < `few` <= medium <= `many` < many) marked. Up to 100
    classes every class is a point; above, classes are binned by training count (bins never straddle a
    boundary) and each point is the mean accuracy of a bin's classes, with the classes per bin as grey bars.
    `path`: a file name or a binary file object (PNG); `title` is also stored as the PNG's Title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(train_counts)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    binned = len(counts) > 100
    if binned:
        edges = _count_bins(counts, many, few)
        which = np.searchsorted(edges, counts, side="right") - 1
        used = np.unique(which)
        centres = np.array([np.exp(np.log(counts[which == b]).mean()) for b in used])
        bars = ax.twinx()
        bars.bar(edges[used], np.bincount(which)[used], width=np.diff(edges)[used], align="edge", color="0.88",
                 edgecolor="white")
        bars.set_ylabel("classes per bin", color="0.5")
        bars.tick_params(axis="y", colors="0.5")
        ax.set_zorder(bars.get_zorder() + 1)
        ax.patch.set_visible(False)
    for label, acc in per_class.items():
        acc = np.array([np.nan if a is None else a for a in acc], dtype=float)
        if binned:
            means = [np.nanmean(acc[which == b]) if np.isfinite(acc[which == b]).any() else np.nan for b in used]
            ax.plot(centres, means, marker="o", ms=4, label=label or None)
        else:
            order = np.argsort(-counts, kind="stable")
            ax.plot(counts[order], acc[order], marker="o", label=label or None)
    for x, text, align in ((few - 0.5, f"few < {few} ", "right"), (many + 0.5, f" many > {many}", "left")):
        ax.axvline(x, color="0.4", ls="--", lw=0.8)
        ax.text(x, 101, text, fontsize=8, color="0.3", ha=align, va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log)")
    what = f"{split} accuracy" if split else "accuracy"
    ax.set_ylabel(f"{what} of the class (%)" if not binned else f"mean {what} of the bin's classes (%)")
    ax.set_ylim(-2, 108)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if any(per_class):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png", metadata={"Title": title} if title else None)
    plt.close(fig)


def _count_bins(counts: np.ndarray, many: int, few: int, bins: int = 20) -> np.ndarray:
    """Edges e_0 < ... < e_n of integer training-count bins [e_j, e_j+1): about `bins` log-spaced bins over
    the counts, with `few` and `many` + 1 among the edges, so that every bin lies in one shot group."""
    lo, hi = int(counts.min()), int(counts.max()) + 1
    edges = np.unique(np.round(np.geomspace(max(lo, 1), hi, bins + 1)).astype(np.int64))
    inside = [e for e in (few, many + 1) if lo < e < hi]
    return np.unique(np.concatenate([[lo, hi], edges[(edges > lo) & (edges < hi)], inside])).astype(float)


# ------------------------------------------------------------------------------------------------------
# python -m fasttrain.evaluate: evaluate a saved model (RUN/model.pt) on a dataset's test or val split.
EPILOG = """examples:
  python -m fasttrain.evaluate --data data/cifar10_lt_r100 --checkpoint runs/ce/model.pt
  fasttrain-evaluate --data data/imagenet_lt --checkpoint runs/in_ce/model.pt --split val --loader dali --out runs/in_ce/val
  accelerate launch -m fasttrain.evaluate --data data/imagenet_lt --checkpoint runs/in_ce/model.pt

Writes OUT/metrics.json (top-1, top-5, many/medium/few-shot, per-class), OUT/confusion.npz (sparse) and
OUT/per_class.png, as training does. The model's settings (arch, width, head, eval crop, shot thresholds)
come from the checkpoint and from the config.yaml of its run directory, when present."""


def parse_args(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python -m fasttrain.evaluate", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Evaluate a trained model: the same metrics.json, confusion.npz and "
                                            "per_class.png as a training run writes. Runs under `python` (one "
                                            "process) and `accelerate launch` (each process evaluates its part of "
                                            "the split; every image once).")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset directory written by data_prep.convert")
    p.add_argument("--checkpoint", required=True, metavar="RUN/model.pt",
                   help="model.pt written at the end of training (or its run directory)")
    p.add_argument("--split", default=None, metavar="{test,val}",
                   help="split to evaluate (default: the run's eval split; else test if present, else val)")
    p.add_argument("--loader", default=None, choices=("ffcv", "dali", "torch", "device"),
                   help="input pipeline (default: the run's --loader, else ffcv)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per process (default: 256)")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="loader workers; 0 = all cores (default: 0)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where to write the results (default: RUN/eval_SPLIT next to the checkpoint)")
    return p.parse_args(argv)


def evaluate_checkpoint(data, checkpoint, *, split=None, loader=None, batch_size=256, workers=0, out=None,
                        accelerator=None) -> tuple[dict, Path]:
    """Load RUN/model.pt, evaluate it on `split` of `data`, write the report into `out`; returns
    (metrics, out). Shot groups use the run's own training class counts (from its metrics.json) when known."""
    from accelerate import Accelerator

    from .config import Config
    from .data import build_loader
    from .dataset import DatasetDir, DatasetError
    from .methods.base import Method

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / "model.pt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: not found; give the model.pt of a finished run")
    run_dir = checkpoint.parent
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or "state_dict" not in saved or "arch" not in saved:
        raise ValueError(f"--checkpoint {checkpoint}: not a fasttrain model.pt (no arch/state_dict); for an "
                         f"accelerate checkpoint directory give the run's model.pt instead")
    cfg = Config.load(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else Config()
    cfg = cfg.update({"data": str(data), "arch": saved["arch"], "width": saved.get("width", cfg.width),
                      "head": saved.get("head", cfg.head)})
    dataset = DatasetDir(data)
    if saved["num_classes"] != dataset.num_classes:
        raise DatasetError(f"--checkpoint {checkpoint} classifies {saved['num_classes']} classes but {data} has "
                           f"{dataset.num_classes} (method {saved.get('method', '?')}); give the matching --data")
    split = split or cfg.eval_split or dataset.eval_split()
    dataset.split(split)  # a clear error when the dataset has no such split
    acc = accelerator or Accelerator(mixed_precision=cfg.precision)
    method = Method(cfg, dataset)
    model = method.build_model()
    model.load_state_dict(saved["state_dict"])
    model = model.to(acc.device)
    eval_loader = build_loader(dataset, split, kind=loader or cfg.loader, batch_size=batch_size,
                               views=method.views(train=False), train=False, rank=acc.process_index,
                               world_size=acc.num_processes, device=acc.device, channels_last=cfg.channels_last,
                               workers=workers)
    run_metrics = run_dir / "metrics.json"
    counts = (json.loads(run_metrics.read_text()).get("train_class_counts") if run_metrics.is_file() else None) \
        or dataset.split(cfg.train_split).class_counts
    with eval_loader, acc.autocast():
        metrics, confusion = evaluate(model, eval_loader, dataset.num_classes, counts, acc,
                                      many=cfg.many_threshold, few=cfg.few_threshold)
    out = Path(out) if out else run_dir / f"eval_{split}"
    metrics.update(split=split, checkpoint=str(checkpoint), data=str(data))
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_report(out, metrics, confusion, counts, dataset.class_names)
    acc.wait_for_everyone()
    return metrics, out


def main(argv=None) -> int:
    import sys
    args = parse_args(argv)
    try:
        metrics, out = evaluate_checkpoint(args.data, args.checkpoint, split=args.split, loader=args.loader,
                                           batch_size=args.batch_size, workers=args.workers, out=args.out)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # DatasetError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    from accelerate import PartialState
    if PartialState().is_main_process:
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{metrics['split']}: top1 {fmt(metrics['top1'])} top5 {fmt(metrics['top5'])} many {fmt(metrics['many'])} "
              f"medium {fmt(metrics['medium'])} few {fmt(metrics['few'])} ({metrics['num_eval_images']} images); "
              f"wrote {out}/metrics.json, confusion.npz, per_class.png")
    return 0


def cli() -> None:
    """The `fasttrain-evaluate` command and `python -m fasttrain.evaluate`: main, ended by fasttrain/entry.py
    (under `accelerate launch` each rank ends with os._exit and main's code)."""
    from .entry import run_main
    run_main(main)


if __name__ == "__main__":
    cli()
