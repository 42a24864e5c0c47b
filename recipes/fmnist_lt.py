"""The embedded default: the paper's two findings on real Fashion-MNIST-LT, on 2 CPU cores.

Converts Fashion-MNIST-LT (exp, rho 100, 1,000 labeled images for the largest class down to 10; an
unlabeled pool 5x that size with rho_U 100 from the remaining train images), then trains with the same
model, epochs and seed:
  CE                    plain cross-entropy on the labeled long-tailed set
  CE + rotation SSP     rotation pre-training on the same labeled images, then CE from that backbone
  CE + self-training    pseudo-label the pool with the CE model, then CE on labeled + pseudo-labeled
and prints / saves a table of top-1, many/medium/few-shot and per-class accuracy with a PNG plot.

    python recipes/fmnist_lt.py --out runs/fmnist_lt          # `make demo`
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import CIFAR  # noqa: E402

from fasttrain.chain import Stage, process_state, run_chain  # noqa: E402
from fasttrain.evaluate import plot_per_class  # noqa: E402

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
CONVERT = ["--source", "fmnist", "--root", FMNIST_ROOT, "--profile", "exp", "--rho", "100",
           "--max-per-class", "1000", "--rho-u", "100", "--unlabeled-factor", "5", "--seed", "0",
           "--formats", "ffcv,dali"]

# Sized for about 10 minutes on 2 CPU cores: ResNet-32 at half width, 20 epochs, the CIFAR recipe's
# schedule scaled to that length (200 -> 20 epochs: warm-up 1 (per step), lr x0.01 at 16 and x0.0001 at 18),
# evaluation every 5 epochs (and the last).
DEMO = dict(CIFAR, width=0.5, epochs=20, warmup_epochs=1, lr_update="step", batch_size=128, seed=0, eval_every=5,
            loader="device")
STAGES = [
    Stage("ce", DEMO),
    Stage("rotation", dict(DEMO, method="rotation")),
    Stage("ce_rotation_ssp", dict(DEMO, pretrained="{root}/rotation/backbone.pt")),
    Stage("pseudo", DEMO, kind="pseudo_label", source="{root}/ce"),
    Stage("ce_self_training", dict(DEMO, method="self_training", pseudo_labels="{root}/pseudo/pseudo_labels.npz")),
]
TABLE = [("CE", "ce"), ("CE + rotation SSP", "ce_rotation_ssp"), ("CE + self-training", "ce_self_training")]


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        run_chain(STAGES, __doc__, argv)  # prints the help and exits, before any conversion
    out = Path(_value(argv, "--out") or _value(argv, "--resume") or "runs/fmnist_lt")
    if "--out" not in argv and "--resume" not in argv:
        argv += ["--out", str(out)]
    if _value(argv, "--data") is None:
        data = out / "data"
        state = process_state()  # under `accelerate launch`, one process converts while the others wait
        if state.is_main_process and not (data / "manifest.json").exists():
            subprocess.run([sys.executable, "-m", "data_prep.convert", *CONVERT, "--out", str(data)], check=True)
        state.wait_for_everyone()
        argv += ["--data", str(data)]
    if run_chain(STAGES, __doc__, argv) == "done":
        report(out)


def report(out: Path) -> None:
    rows, per_class, counts = [], {}, None
    for label, stage in TABLE:
        path = out / stage / "metrics.json"
        if not path.exists():
            continue
        m = json.loads(path.read_text())
        counts = m["train_class_counts"]
        per_class[label] = m["per_class"]
        rows.append((label, m["top1"], m["many"], m["medium"], m["few"], m["per_class"]))
    if not rows:
        return
    fmt = lambda v: "  n/a" if v is None else f"{v:5.1f}"  # noqa: E731
    lines = ["| method | top-1 | many (>100) | medium (20-100) | few (<20) | per-class (classes by train count, "
             + "/".join(str(c) for c in counts) + ") |", "|---|---|---|---|---|---|"]
    lines += [f"| {label} | {fmt(t)} | {fmt(a)} | {fmt(b)} | {fmt(c)} | " + " ".join(fmt(v).strip() for v in pc) + " |"
              for label, t, a, b, c, pc in rows]
    pseudo, hidden = out / "pseudo" / "pseudo_labels.npz", out / "data" / "unlabeled.true_labels.npy"
    if pseudo.exists() and hidden.exists():  # analysis only: the hidden labels never reached training
        correct = np.mean(np.load(pseudo)["label"] == np.load(hidden))
        lines.append(f"\nPseudo-labels of the unlabeled pool: {100 * correct:.1f}% correct (checked after training "
                     f"against the pool's hidden labels, which training never reads).")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    plot_per_class(per_class, counts, out / "per_class.png", title="Fashion-MNIST-LT (rho 100), test accuracy")
    print("\n" + table + f"\n\nsaved {out / 'results.md'} and {out / 'per_class.png'}")


def _value(argv, flag):
    return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else None


if __name__ == "__main__":
    main()
