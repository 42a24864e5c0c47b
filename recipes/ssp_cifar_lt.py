"""Self-supervised pre-training on CIFAR-LT (rotation prediction on the labeled long-tailed set itself, no
extra data), then from that backbone CE (uniform), CE with the paper's Resample sampler (its "CE (balanced)":
train.py --train_rule Resample), CE-DRW and LDAM-DRW (cosine head). ResNet-32, the paper's CIFAR settings for
every stage (200 epochs, batch 128, lr 0.1, warm-up 5/200, x0.01 at 160/200, x0.0001 at 180/200, DRW from
160/200; positions in the run, so --epochs keeps the shape).

    python recipes/ssp_cifar_lt.py --data DATA --out RUN [--epochs 200] [--set ldam_drw.lr=0.1]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import CIFAR, DRW, LDAM_DRW, RESAMPLE, ROTATION  # noqa: E402

from fasttrain.chain import Stage, run_chain  # noqa: E402
from fasttrain.entry import run_main  # noqa: E402

SSP = "{root}/rotation/backbone.pt"
STAGES = [
    Stage("rotation", ROTATION),
    Stage("ce", dict(CIFAR, pretrained=SSP)),
    Stage("ce_resample", dict(CIFAR, **RESAMPLE, pretrained=SSP)),
    Stage("ce_drw", dict(CIFAR, **DRW, pretrained=SSP)),
    Stage("ldam_drw", dict(CIFAR, **LDAM_DRW, pretrained=SSP)),
]

if __name__ == "__main__":
    run_main(run_chain, STAGES, __doc__)
