"""Compare runs: a Markdown table of top-1 and many/medium/few-shot accuracy (final and best epoch), seeds
averaged as mean ± sd, and a grouped bar plot of the shot groups.

    python -m fasttrain.report runs/ce_s0 runs/ce_s1 runs/ldam_s0 --out results.md
    python -m fasttrain.report runs/c10_ssp          # a chain: one row per stage

As a library (each group's runs given in seed order):

    summary = summarize({"CE": [run_s0, run_s1], "CE + rotation SSP": [ssp_s0, ssp_s1]})
    write_results(summary, "results.json"); print(markdown(summary)); plot_groups(summary, "groups.png")

Each run's metrics.json holds a "final" block and (for runs that evaluate) a "best" block; `read_blocks` turns
them into whole records (per-class accuracies included, which the file keeps once). Older run directories
without the "final" block are read from the top-level keys, which describe the final epoch.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

from .files import atomic_file
METRICS = ("top1", "many", "medium", "few", "epoch")
BLOCKS = ("final", "best")
# config keys that do not change what a run computes: runs differing only in these (and the seed) are repeats
NOT_THE_SETTING = {"seed", "out", "resume", "workers", "log_every", "stop_after_epochs", "tracker_dir", "log_with"}
SEED_PATHS = {"pretrained", "data"}   # compared with a seed in the path dropped (per-seed backbones, pseudo-labeled sets)


class ReportError(ValueError):
    """A run directory that cannot be reported (one clear line)."""


# ------------------------------------------------------------------------------------------------------
def read_run(run: str | Path) -> dict:
    """{"path", "seed", "config", "final": {...}, "best": {...} | None} of one run directory."""
    run = Path(run)
    path = run / "metrics.json"
    if not path.is_file():
        raise ReportError(f"{path} not found: {run} is not a finished fasttrain run (or it does not evaluate)")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    config_path = run / "config.yaml"
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    final, best = read_blocks(metrics)
    return {"path": str(run), "seed": config.get("seed"), "config": config, "final": final, "best": best}


def read_blocks(metrics: dict) -> tuple[dict, dict | None]:
    """(final, best) of a loaded metrics.json, each a whole evaluation record: epoch, split, top-1/5,
    many/medium/few, label and per_class. metrics.json keeps the final per-class accuracies once, at the top
    level, and the best block's own only when its epoch is not the final one (fasttrain.evaluate's
    METRICS_LAYOUT); older files without the blocks are read from the top level (the final epoch)."""
    final = dict(metrics.get("final") or {k: metrics.get(k) for k in ("epoch", "split", "top1", "top5", "many",
                                                                      "medium", "few")})
    final.setdefault("per_class", metrics.get("per_class"))
    best = dict(metrics["best"]) if metrics.get("best") else None
    if best is not None:
        best.setdefault("per_class", metrics.get("per_class"))
    return final, best


def _stats(values: list) -> dict:
    """mean and sample sd (ddof=1; 0.0 for one value) over the values that are not None."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"mean": None, "sd": None, "per_seed": list(values)}
    mean = sum(present) / len(present)
    sd = math.sqrt(sum((v - mean) ** 2 for v in present) / (len(present) - 1)) if len(present) > 1 else 0.0
    return {"mean": mean, "sd": sd, "per_seed": list(values)}


def summarize(groups: dict[str, list]) -> dict:
    """groups: {method label: [run directories, in seed order]} -> {"seeds": [...], "rows": [...]}.

    Row: {"method", "runs", "seeds", "final": {metric: {"mean", "sd", "per_seed"}}, "best": {same keys},
    "split": {"final": "test", "best": "test", "selected_on": "val"}} for metric in top1 / many / medium /
    few / epoch. A None value (an empty shot group, or a run without a "best" block) is kept as None in
    per_seed and left out of the mean (mean and sd are None when no run has a value)."""
    rows, all_seeds = [], []
    for label, runs in groups.items():
        if not runs:
            raise ReportError(f"{label!r}: no run directories given")
        loaded = [read_run(r) for r in runs]
        seeds = [r["seed"] for r in loaded]
        all_seeds.append(seeds)
        row = {"method": label, "runs": [r["path"] for r in loaded], "seeds": seeds}
        row["split"] = {}
        for block in BLOCKS:
            blocks = [r[block] for r in loaded]
            row[block] = {m: _stats([None if b is None else b.get(m) for b in blocks]) for m in METRICS}
            row["split"][block] = _common([b.get("split") for b in blocks if b is not None])
        row["split"]["selected_on"] = _common([r["best"].get("selected_on") for r in loaded if r["best"]])
        rows.append(row)
    seeds = all_seeds[0] if all_seeds and all(s == all_seeds[0] for s in all_seeds) else \
        sorted({s for group in all_seeds for s in group if s is not None})
    return {"seeds": seeds, "rows": rows}


def _common(values: list):
    """The one value all entries share, else None."""
    distinct = set(values) - {None}
    return distinct.pop() if len(distinct) == 1 else None


def write_results(summary: dict, path: str | Path) -> None:
    """The summary as JSON, written under a temporary name and renamed (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(json.dumps(summary, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------------
def _cell(stat: dict | None, n_runs: int, epoch: bool = False) -> str:
    if stat is None or stat["mean"] is None:
        return "n/a"
    if epoch:  # stored 0-based; shown as the training log counts (1-based)
        values = {int(v) + 1 for v in stat["per_seed"] if v is not None}
        return str(values.pop()) if len(values) == 1 else "/".join(str(int(v) + 1) if v is not None else "-"
                                                                   for v in stat["per_seed"])
    present = sum(v is not None for v in stat["per_seed"])
    if n_runs == 1 or present == 1:
        return f"{stat['mean']:.1f}"
    return f"{stat['mean']:.1f} ± {stat['sd']:.1f}"


def markdown(summary: dict) -> str:
    """Markdown tables (final epoch, then best epoch where any row has one): method | top-1 | many | medium |
    few | epoch; each cell "mean ± sd" over the seeds (one run: the value alone). Accuracies in percent."""
    rows = summary["rows"]
    seeds = summary.get("seeds") or []
    out = []
    for block in BLOCKS:
        present = [r for r in rows if r.get(block) and r[block]["top1"]["mean"] is not None]
        if not present:
            continue
        split = _common([r.get("split", {}).get(block) for r in present])
        where = f" ({split} split)" if split else ""
        if block == "best":
            chosen = _common([r.get("split", {}).get("selected_on") for r in present])
            title = f"**Best epoch**{where}" + (f", selected on {chosen} top-1" if chosen else "")
        else:
            title = f"**Final epoch**{where}"
        if len(seeds) > 1:
            title += f"; mean ± sd over seeds {', '.join(map(str, seeds))}"
        out += [title, "", "| method | top-1 | many | medium | few | epoch |", "|---|---|---|---|---|---|"]
        for r in rows:
            b, n = r.get(block), len(r["runs"])
            cells = [_cell(b[m] if b else None, n, epoch=m == "epoch") for m in METRICS]
            out.append(f"| {r['method']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def plot_groups(summary: dict, path: str | Path, title: str | None = None) -> None:
    """Grouped bar plot: for each row, many / medium / few-shot accuracy of the final epoch (error bar: sd)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = summary["rows"]
    groups = ("many", "medium", "few")
    x = np.arange(len(rows))
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 4.2))
    for j, group in enumerate(groups):
        stats = [(r["final"] or {}).get(group) or {"mean": None, "sd": None} for r in rows]
        means = [np.nan if s["mean"] is None else s["mean"] for s in stats]
        sds = [0.0 if s["sd"] is None else s["sd"] for s in stats]
        ax.bar(x + (j - 1) * width, means, width, yerr=sds if any(sds) else None, capsize=3, label=group)
    ax.set_xticks(x)
    ax.set_xticklabels([r["method"] for r in rows], rotation=20 if len(rows) > 3 else 0, ha="right"
                       if len(rows) > 3 else "center")
    ax.set_ylabel("accuracy (%), final epoch")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="shot group")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------
def expand(paths: list) -> list[tuple[str, Path]]:
    """Command-line paths -> (label, run directory): a run directory is itself; a chain directory (no
    metrics.json, sub-directories with one) gives one entry per stage, labelled "chain/stage"."""
    out = []
    for p in map(Path, paths):
        if (p / "metrics.json").is_file():
            out.append((p.name or str(p), p))
            continue
        stages = sorted(d for d in p.iterdir() if (d / "metrics.json").is_file()) if p.is_dir() else []
        if not stages:
            why = "does not exist" if not p.exists() else "holds no metrics.json (nor stage directories with one)"
            raise ReportError(f"{p} {why}; give finished run directories or chain directories")
        out += [(f"{p.name}/{d.name}", d) for d in stages]
    return out


def group_by_setting(runs: list[tuple[str, Path]]) -> dict[str, list[Path]]:
    """Runs whose config.yaml is the same apart from the seed and bookkeeping (out, resume, workers, log
    settings) are one row, in seed order; paths that name a seed (a chain's `pretrained: runs/x_s1/ssp/...`)
    are compared with the seed dropped. A seed already in a row starts a new row (never two runs of one seed
    averaged). The row takes its first run's label, seed suffix dropped."""
    rows: list[tuple[str, str, list]] = []   # (setting, label, [(seed, path)])
    for label, path in runs:
        cfg_path = path / "config.yaml"
        cfg = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.is_file() else {}
        setting = {k: (_strip_seed(v) if k in SEED_PATHS and isinstance(v, str) else v)
                   for k, v in cfg.items() if k not in NOT_THE_SETTING}
        key = json.dumps(setting, sort_keys=True, default=str) if cfg else str(path)
        seed = cfg.get("seed")
        row = next((r for r in rows if r[0] == key and seed not in [m[0] for m in r[2]]), None)
        if row is None:
            rows.append((key, label, [(seed, path)]))
        else:
            row[2].append((seed, path))
    out = {}
    for _, label, members in rows:
        members.sort(key=lambda m: (m[0] is None, m[0] if m[0] is not None else 0))
        if len(members) > 1:
            label = _strip_seed(label)
        while label in out:
            label += "'"
        out[label] = [p for _, p in members]
    return out


def _strip_seed(label: str) -> str:
    """"runs/ce_seed1/joint" -> "runs/ce/joint": drop a seed suffix from each part of the label."""
    import re
    return "/".join(re.sub(r"[_\-.]?(seed|s)[_\-]?\d+$", "", part) or part for part in str(label).split("/"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="fasttrain-report", description="Compare finished runs: one Markdown row per run (or per stage of a "
        "chain directory), top-1 and many/medium/few-shot accuracy at the final and the best epoch. Runs whose "
        "config.yaml differs only in the seed (or out / resume) are one row with mean ± sd over the seeds.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m fasttrain.report runs/ce_s0 runs/ce_s1 runs/ce_s2 runs/ldam_s0 --out cmp.md\n"
               "  fasttrain-report runs/c10_ssp            # a chain directory: one row per stage\n"
               "  fasttrain-report runs/* --json cmp.json --plot cmp.png")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (holding metrics.json) or chain "
                   "directories (holding stage directories)")
    p.add_argument("--out", metavar="FILE.md", help="also write the table to this file (default: print only)")
    p.add_argument("--plot", metavar="FILE.png", help="grouped bar plot of many/medium/few per row (default: "
                   "next to --out as FILE.png, or none without --out)")
    p.add_argument("--json", metavar="FILE.json", help="also write the summary (means, sds, per-seed values) "
                   "as JSON")
    args = p.parse_args(argv)
    try:
        summary = summarize(group_by_setting(expand(args.runs)))
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = markdown(summary)
    print(table, end="")
    plot = args.plot or (str(Path(args.out).with_suffix(".png")) if args.out else None)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
    if args.json:
        write_results(summary, args.json)
    if plot:
        plot_groups(summary, plot)
    written = [f for f in (args.out, args.json, plot) if f]
    if written:
        print(f"\nwrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
