"""Semi-supervised self-training on CIFAR-LT with an unlabeled pool (converted with --unlabeled-file), as
the paper's gen_pseudolabels.py + train_semi.py: base model on the labeled set -> pseudo-label the pool
(argmax, every pool image; --pseudo-threshold keeps only confident ones) and write RUN/pseudo/data, one
training split of labeled + pseudo-labeled images -> joint training: an ordinary supervised run on that set
(batch 256 as train_semi.py; an epoch is one pass over the union; any loss / re-weighting / sampler, whose
class counts are labeled + pseudo-label counts; many/medium/few groups use the labeled counts).
Departure: like every fasttrain training loader, the joint epoch drops its last incomplete batch (at most
255 of the union's images per epoch, a different subset each epoch); the paper's DataLoader keeps it. Every
rank then takes equal, full batches.

    python recipes/semi_cifar_lt.py --data DATA --out RUN [--loss ldam --head cosine --reweight drw]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import CIFAR, SEMI  # noqa: E402

from fasttrain.chain import Stage, run_chain  # noqa: E402

STAGES = [
    Stage("base", CIFAR),
    Stage("pseudo", CIFAR, kind="pseudo_label", source="{root}/base"),
    Stage("joint", SEMI, data="{root}/pseudo/data"),
]

if __name__ == "__main__":
    run_chain(STAGES, __doc__)
