"""Supervised feature learning on iNaturalist 2018, as the paper's config/iNaturalist18/feat_unifrom.yaml:
ResNet-50, CE, uniform sampling, 90 epochs, SGD lr 0.2 at batch 100 (momentum 0.9, wd 1e-4), cosine to 0
stepped once per epoch. iNaturalist has no labeled test split: the best epoch is selected on val and val is
reported (final epoch and best-val epoch), as the paper does.

    accelerate launch recipes/supervised_inat.py --data DATA --out RUN [--batch-size 800]

--batch-size is global; the lr scales linearly with it (0.2 x batch / 100: batch 800 trains at lr 1.6), and
the engine prints the global batch, the per-GPU batch and the lr at start.
Outputs backbone.pt (final epoch) and backbone_best.pt (best-val epoch: what the paper's code hands to cRT).
Departures from the paper's code: bf16 autocast, channels_last and the FFCV loader for throughput
(`--precision no` trains in fp32).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import INAT  # noqa: E402

from fasttrain.chain import run_single  # noqa: E402
from fasttrain.entry import run_main  # noqa: E402

if __name__ == "__main__":
    run_main(run_single, INAT, __doc__)
