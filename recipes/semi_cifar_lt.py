"""Semi-supervised self-training on CIFAR-LT with an unlabeled pool (converted with --unlabeled-file):
base model on the labeled set -> pseudo-label the pool -> joint training on labeled + pseudo-labeled data.

    python recipes/semi_cifar_lt.py --data DATA --out RUN [--loss ldam --head cosine --reweight drw]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import CIFAR  # noqa: E402

from fasttrain.chain import Stage, run_chain  # noqa: E402

STAGES = [
    Stage("base", CIFAR),
    Stage("pseudo", CIFAR, kind="pseudo_label", source="{root}/base"),
    Stage("joint", dict(CIFAR, method="self_training", pseudo_labels="{root}/pseudo/pseudo_labels.npz")),
]

if __name__ == "__main__":
    run_chain(STAGES, __doc__)
