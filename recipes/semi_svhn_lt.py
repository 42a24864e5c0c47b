"""Semi-supervised self-training on SVHN-LT, with the `extra` split as the unlabeled pool (convert with
`--source svhn`): CE base model -> pseudo-label the pool with its final weights -> joint training.
ResNet-32, paper defaults; the stages, and which of them the flags reach, are those of semi_cifar_lt.py
(method flags such as --loss reach the joint stage only; --set base.KEY=VALUE sets the base model).

    python recipes/semi_svhn_lt.py --data DATA --out RUN [--loss ldam --reweight drw]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from semi_cifar_lt import STAGES  # noqa: E402

from fasttrain.chain import run_chain  # noqa: E402
from fasttrain.entry import run_main  # noqa: E402

if __name__ == "__main__":
    run_main(run_chain, STAGES, __doc__)
