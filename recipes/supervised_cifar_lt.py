"""Supervised training on a small-image long-tailed set (CIFAR-10/100-LT, SVHN-LT, Fashion-MNIST-LT):
ResNet-32, the paper's CIFAR schedule. Image size, channels and classes come from the dataset manifest.

    python recipes/supervised_cifar_lt.py --data DATA --out RUN [--loss ldam --head cosine --reweight drw]
    accelerate launch recipes/supervised_cifar_lt.py --data DATA --out RUN
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import CIFAR  # noqa: E402

from fasttrain.chain import run_single  # noqa: E402

if __name__ == "__main__":
    run_single(CIFAR, __doc__)
