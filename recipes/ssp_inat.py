"""Self-supervised pre-training on iNaturalist 2018, then the supervised methods from that backbone:
MoCo v2 -> CE (uniform) / CE (class-balanced sampling) -> cRT. The same chain and defaults as ImageNet-LT
(ResNet-50, 90 epochs, cosine lr 0.2 at batch 512); each stage resumes by itself.

    accelerate launch recipes/ssp_inat.py --data DATA --out RUN
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ssp_imagenet_lt import STAGES  # noqa: E402

from fasttrain.chain import run_chain  # noqa: E402

if __name__ == "__main__":
    run_chain(STAGES, __doc__)
