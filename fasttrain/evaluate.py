"""Evaluation: top-1/top-5, many/medium/few-shot and per-class accuracy, confusion matrix, plot.

Every rank evaluates its own block of the eval split (each image exactly once); the per-class
counts are summed over ranks, so the metrics do not depend on the number of processes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def evaluate(model, loader, num_classes: int, train_counts, accelerator=None, *, many: int = 100,
             few: int = 20) -> tuple[dict, np.ndarray]:
    was_training = model.training
    model.eval()
    loader.set_epoch(0)
    device = next(model.parameters()).device
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    top5_hits = torch.zeros(num_classes, dtype=torch.long, device=device)
    k = min(5, num_classes)
    for batch in loader:
        logits = model(batch.images).float()
        labels = batch.labels
        confusion.index_put_((labels, logits.argmax(1)), torch.ones_like(labels), accumulate=True)
        hit5 = (logits.topk(k, dim=1).indices == labels[:, None]).any(1).long()
        top5_hits.index_add_(0, labels, hit5)
    if accelerator is not None and accelerator.num_processes > 1:
        confusion, top5_hits = accelerator.reduce(confusion, "sum"), accelerator.reduce(top5_hits, "sum")
    model.train(was_training)
    confusion = confusion.cpu().numpy()
    return summarize(confusion, top5_hits.cpu().numpy(), train_counts, many=many, few=few), confusion


def summarize(confusion: np.ndarray, top5_hits: np.ndarray, train_counts, *, many: int = 100,
              few: int = 20) -> dict:
    """Accuracies in percent. Shot groups by training count: many > `many`, few < `few`, else medium;
    a group with no classes (or no test images) is None."""
    per_class_n = confusion.sum(1)
    correct = np.diag(confusion)
    total = int(per_class_n.sum())
    per_class = [float(100 * c / n) if n else None for c, n in zip(correct, per_class_n)]
    counts = np.asarray(train_counts)
    groups = {"many": counts > many, "medium": (counts >= few) & (counts <= many), "few": counts < few}

    def group_acc(mask):
        n = per_class_n[mask].sum()
        return float(100 * correct[mask].sum() / n) if n else None

    return {"top1": float(100 * correct.sum() / total), "top5": float(100 * top5_hits.sum() / total),
            **{g: group_acc(m) for g, m in groups.items()},
            "group_sizes": {g: int(m.sum()) for g, m in groups.items()},
            "thresholds": {"many": many, "few": few}, "num_eval_images": total,
            "per_class": per_class, "train_class_counts": [int(c) for c in counts]}


BLOCK_KEYS = ("epoch", "split", "top1", "top5", "many", "medium", "few", "per_class")


def write_report(run_dir: Path, metrics: dict, confusion: np.ndarray, train_counts, class_names=None, *,
                 best: dict | None = None, epochs: int | None = None) -> dict:
    """metrics.json, confusion.npy and per_class.png (accuracy against training count) in the run dir.

    metrics.json: the final epoch's evaluation at the top level, and the blocks "final" and "best" (the epoch
    with the highest top-1 on `best["selected_on"]`, reported on `best["split"]`), each with a "label" saying
    what it is. Returns what it wrote."""
    run_dir = Path(run_dir)
    report = dict(metrics)
    report["final"] = {k: metrics.get(k) for k in BLOCK_KEYS} | {"label": _label(metrics, None, epochs)}
    if best is not None:
        report["best"] = ({k: best.get(k) for k in BLOCK_KEYS} | {"selected_on": best["selected_on"]}
                          | {"selection_top1": best.get("selection_top1"), "label": _label(best, best, epochs)})
        report.update(best_top1=best["top1"], best_epoch=best["epoch"])
    (run_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    np.save(run_dir / "confusion.npy", confusion)
    plot_per_class({"": metrics["per_class"]}, train_counts, run_dir / "per_class.png", class_names=class_names)
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


def plot_per_class(per_class: dict[str, list], train_counts, path: Path, class_names=None, title=None) -> None:
    """Per-class test accuracy against the number of training images, one series per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(train_counts)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, acc in per_class.items():
        acc = np.array([np.nan if a is None else a for a in acc], dtype=float)
        if len(counts) <= 100:
            order = np.argsort(-counts, kind="stable")
            ax.plot(counts[order], acc[order], marker="o", label=label or None)
        else:
            ax.scatter(counts, acc, s=6, alpha=0.5, label=label or None)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log)")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if any(per_class):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------
# python -m fasttrain.evaluate: evaluate a saved model (RUN/model.pt) on a dataset's test or val split.
EPILOG = """examples:
  python -m fasttrain.evaluate --data data/cifar10_lt_r100 --checkpoint runs/ce/model.pt
  fasttrain-evaluate --data data/imagenet_lt --checkpoint runs/in_ce/model.pt --split val --loader dali --out runs/in_ce/val
  accelerate launch -m fasttrain.evaluate --data data/imagenet_lt --checkpoint runs/in_ce/model.pt

Writes OUT/metrics.json (top-1, top-5, many/medium/few-shot, per-class), OUT/confusion.npy and
OUT/per_class.png, as training does. The model's settings (arch, width, head, eval crop, shot thresholds)
come from the checkpoint and from the config.yaml of its run directory, when present."""


def parse_args(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python -m fasttrain.evaluate", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Evaluate a trained model: the same metrics.json, confusion.npy and "
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
              f"wrote {out}/metrics.json, confusion.npy, per_class.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
