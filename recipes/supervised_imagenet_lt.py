"""Supervised feature learning on ImageNet-LT, as the paper's config/ImageNet_LT/feat_uniform.yaml:
ResNet-50, CE, uniform sampling, 90 epochs, SGD lr 0.2 at batch 128 (momentum 0.9, wd 5e-4), cosine to 0
stepped once per epoch; the best epoch is selected on val top-1 and metrics.json reports test for the final
epoch and for that best-val epoch.

    accelerate launch recipes/supervised_imagenet_lt.py --data DATA --out RUN [--batch-size 1024]

--batch-size is global; the lr scales linearly with it (0.2 x batch / 128: batch 1024 trains at lr 1.6), and
the engine prints the global batch, the per-GPU batch and the lr at start. `--sampler class_aware` is the
paper's feat_balance.yaml (4 images of a class in a row).
Training crop: RandomResizedCrop 224 + flip + colour jitter 0.4 (brightness, contrast, saturation), as the
paper's ImageNet-LT transform; eval: resize 256, center crop 224. Outputs backbone.pt (final epoch) and
backbone_best.pt (best-val epoch: what the paper's code hands to cRT).
Departures from the paper's code: bf16 autocast, channels_last and the FFCV loader for throughput
(`--precision no` trains in fp32); the jitter's factors are applied in a fixed order (torchvision: random).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import IMAGENET_LT  # noqa: E402

from fasttrain.chain import run_single  # noqa: E402
from fasttrain.entry import run_main  # noqa: E402

if __name__ == "__main__":
    run_main(run_single, IMAGENET_LT, __doc__)
