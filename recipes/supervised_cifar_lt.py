"""Supervised training on a small-image long-tailed set (CIFAR-10/100-LT, SVHN-LT, Fashion-MNIST-LT):
ResNet-32, the paper's CIFAR settings (train.py): 200 epochs, batch 128, SGD lr 0.1 (momentum 0.9, wd 2e-4),
linear warm-up over the first 5 epochs, lr x0.01 after epoch 160 and x0.0001 after 180, DRW (--reweight drw)
from epoch 160. These are positions in the run (5/200, 160/200, 180/200), so `--epochs 20` warms up for half
an epoch, decays after 16 and 18 and re-weights from 16. metrics.json has the final epoch and the best test
epoch (the figure the paper's scripts report). Image size, channels and classes come from the dataset manifest.
The paper's train rules: `--reweight cb` (Reweight), `--reweight drw` (DRW), `--sampler resample` (Resample);
`--loss ldam` trains with the cosine head, as the paper's code, unless --head is given.

    python recipes/supervised_cifar_lt.py --data DATA --out RUN [--loss ldam --reweight drw]
    accelerate launch recipes/supervised_cifar_lt.py --data DATA --out RUN
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import CIFAR  # noqa: E402

from fasttrain.chain import run_single  # noqa: E402
from fasttrain.entry import run_main  # noqa: E402

if __name__ == "__main__":
    run_main(run_single, CIFAR, __doc__)
