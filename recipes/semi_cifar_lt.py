"""Semi-supervised self-training on CIFAR-LT with an unlabeled pool (converted with --unlabeled-file), as
the paper's gen_pseudolabels.py + train_semi.py: base model on the labeled set -> pseudo-label the pool
(argmax, every pool image; --pseudo-threshold keeps only confident ones) and write RUN/pseudo/data, one
training split of labeled + pseudo-labeled images -> joint training: an ordinary supervised run on that set
(batch 256 as train_semi.py; an epoch is one pass over the union; any loss / re-weighting / sampler, whose
class counts are labeled + pseudo-label counts; many/medium/few groups use the labeled counts).

The base model is CE (the paper's released pseudo-labels come from CE base models) and the pseudo-labels are
made with its final-epoch weights (RUN/base/model.pt). The paper's gen_pseudolabels.py takes whichever
checkpoint its user passes (train.py writes the last and the best-test-epoch one); fasttrain takes the last,
so that no test accuracy chooses the model that labels the pool. The method flags (--loss, --head,
--reweight, --sampler and their parameters) reach the joint stage only: `--loss ldam --reweight drw` gives
LDAM-DRW (cosine head, as --loss ldam implies) on labeled + pseudo-labeled data with the same CE base model;
`--set base.loss=ldam` changes the base model. Other flags (--epochs, --seed, --loader, ...) reach every stage.
Departure: like every fasttrain training loader, the joint epoch drops its last incomplete batch (at most
255 of the union's images per epoch, a different subset each epoch); the paper's DataLoader keeps it. Every
rank then takes equal, full batches.

    python recipes/semi_cifar_lt.py --data DATA --out RUN [--loss ldam --reweight drw]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import CIFAR, SEMI  # noqa: E402

from fasttrain.chain import Stage, run_chain  # noqa: E402
from fasttrain.entry import run_main  # noqa: E402

STAGES = [
    Stage("base", CIFAR, method_flags=False),
    Stage("pseudo", CIFAR, kind="pseudo_label", source="{root}/base", method_flags=False),
    Stage("joint", SEMI, data="{root}/pseudo/data"),
]

if __name__ == "__main__":
    run_main(run_chain, STAGES, __doc__)
