"""Self-supervised pre-training on CIFAR-LT (rotation prediction on the labeled long-tailed set itself, no
extra data), then CE, CE-DRW and LDAM-DRW from that backbone. ResNet-32, paper defaults.

    python recipes/ssp_cifar_lt.py --data DATA --out RUN [--epochs 200] [--set ldam_drw.lr=0.1]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import CIFAR, DRW, LDAM_DRW, ROTATION  # noqa: E402

from fasttrain.chain import Stage, run_chain  # noqa: E402

SSP = "{root}/rotation/backbone.pt"
STAGES = [
    Stage("rotation", ROTATION),
    Stage("ce", dict(CIFAR, pretrained=SSP)),
    Stage("ce_drw", dict(CIFAR, **DRW, pretrained=SSP)),
    Stage("ldam_drw", dict(CIFAR, **LDAM_DRW, pretrained=SSP)),
]

if __name__ == "__main__":
    run_chain(STAGES, __doc__)
