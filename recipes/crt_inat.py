"""cRT on iNaturalist 2018, as the paper's config/iNaturalist18/cls_crt.yaml: the backbone of a trained run
(`--pretrained`) is frozen and a new classifier is trained for 30 epochs at batch 512, SGD lr 0.2 (momentum
0.9, wd 1e-4), cosine to 0 stepped once per epoch, class-aware sampling with 4 images of a class in a row.
BatchNorm statistics keep updating as in the paper's code (`--crt-freeze-bn true` freezes them). Best epoch
selected on val; val reported (iNaturalist has no labeled test split).

    accelerate launch recipes/crt_inat.py --data DATA --pretrained STAGE1_RUN/backbone_best.pt --out RUN

--batch-size is global; the lr scales linearly with it (0.2 x batch / 512).
`backbone_best.pt` is the stage-1 run's best-val epoch, the weights the paper's code hands to cRT.
Departures from the paper's code: bf16 autocast, channels_last, FFCV (throughput; `--precision no` for
fp32).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import CRT_INAT  # noqa: E402

from fasttrain.chain import run_single  # noqa: E402
from fasttrain.entry import run_main  # noqa: E402

if __name__ == "__main__":
    run_main(run_single, CRT_INAT, __doc__)
