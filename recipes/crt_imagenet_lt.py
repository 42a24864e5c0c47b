"""cRT on ImageNet-LT, as the paper's config/ImageNet_LT/cls_crt.yaml: the backbone of a trained run
(`--pretrained`) is frozen and a new classifier is trained for 10 epochs at batch 512, SGD lr 0.2 (momentum
0.9, wd 5e-4), cosine to 0 stepped once per epoch, with class-aware sampling (a class from a shuffled class
list, 4 of its images in a row, next class; an epoch is as many samples as the training set). Every module is
in train() mode, as in the paper's code, so the backbone's BatchNorm statistics keep updating
(`--crt-freeze-bn true` freezes them). Best epoch selected on val, test reported (final and best-val).

    accelerate launch recipes/crt_imagenet_lt.py --data DATA --pretrained STAGE1_RUN/backbone_best.pt --out RUN

--batch-size is global; the lr scales linearly with it (0.2 x batch / 512).
The training crop is RandomResizedCrop 224 + flip + colour jitter 0.4 (brightness, contrast, saturation) as
the paper's ImageNet-LT transform. `backbone_best.pt` is the stage-1 run's best-val epoch, the weights the
paper's code hands to cRT (`backbone.pt` is its final epoch).
Departures from the paper's code: bf16 autocast, channels_last, FFCV (throughput; `--precision no` for
fp32); the jitter's three factors are applied in a fixed order (torchvision draws a random order).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import CRT_IMAGENET_LT  # noqa: E402

from fasttrain.chain import run_single  # noqa: E402
from fasttrain.entry import run_main  # noqa: E402

if __name__ == "__main__":
    run_main(run_single, CRT_IMAGENET_LT, __doc__)
