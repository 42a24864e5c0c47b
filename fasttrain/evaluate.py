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
    where = f"epoch {block['epoch'] + 1}{of}, {block['split']}"
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
