"""Supervised training on ImageNet-LT (or iNaturalist 2018): ResNet-50, 90 epochs, cosine lr 0.2 at batch
512 (scaled linearly), bf16, channels_last, FFCV loader.

    accelerate launch recipes/supervised_imagenet_lt.py --data DATA --out RUN [--sampler balanced]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import IMAGENET  # noqa: E402

from fasttrain.chain import run_single  # noqa: E402

if __name__ == "__main__":
    run_single(IMAGENET, __doc__)
