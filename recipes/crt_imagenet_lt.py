"""cRT on ImageNet-LT: re-train the classifier of a trained backbone (frozen) with class-balanced
sampling for 10 epochs.

    accelerate launch recipes/crt_imagenet_lt.py --data DATA --pretrained STAGE1_RUN/backbone.pt --out RUN
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import CRT  # noqa: E402

from fasttrain.chain import run_single  # noqa: E402

if __name__ == "__main__":
    run_single(CRT, __doc__)
