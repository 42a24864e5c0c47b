"""Semi-supervised self-training on SVHN-LT, with the `extra` split as the unlabeled pool (convert with
`--source svhn`): base model -> pseudo-label the pool -> joint training. ResNet-32, paper defaults.

    python recipes/semi_svhn_lt.py --data DATA --out RUN
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from semi_cifar_lt import STAGES  # noqa: E402

from fasttrain.chain import run_chain  # noqa: E402

if __name__ == "__main__":
    run_chain(STAGES, __doc__)
