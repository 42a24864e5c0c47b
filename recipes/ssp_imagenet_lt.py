"""Self-supervised pre-training on ImageNet-LT, then the supervised methods from that backbone:
MoCo v2 -> CE (uniform) / CE (class-balanced sampling) -> cRT on the CE backbone. ResNet-50, paper defaults.
Each stage lives in RUN/<stage>; the same command resumes whichever stage was interrupted.

    accelerate launch recipes/ssp_imagenet_lt.py --data DATA --out RUN [--stages moco,ce_uniform]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import CE_BALANCED, CRT, IMAGENET, MOCO  # noqa: E402

from fasttrain.chain import Stage, run_chain  # noqa: E402

STAGES = [
    Stage("moco", MOCO),
    Stage("ce_uniform", dict(IMAGENET, pretrained="{root}/moco/backbone.pt")),
    Stage("ce_balanced", dict(IMAGENET, **CE_BALANCED, pretrained="{root}/moco/backbone.pt")),
    Stage("crt", dict(CRT, pretrained="{root}/ce_uniform/backbone.pt")),
]

if __name__ == "__main__":
    run_chain(STAGES, __doc__)
