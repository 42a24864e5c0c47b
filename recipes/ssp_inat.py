"""Self-supervised pre-training on iNaturalist 2018, then the supervised methods from that backbone, with the
paper's settings (pretrain_moco.py, config/iNaturalist18/*.yaml):
  moco         MoCo v2, 200 epochs, batch 128, lr 0.015, wd 1e-4, cosine (queue 65536, m 0.999, T 0.2, MLP)
  ce_uniform   CE, uniform sampling, 90 epochs, batch 100, lr 0.2, wd 1e-4, cosine (feat_unifrom.yaml)
  ce_balanced  the same with class-aware sampling (the paper released no iNaturalist config for it: these are
               ImageNet-LT's feat_balance.yaml choices with iNaturalist's batch and weight decay)
  crt          cRT on the ce_uniform backbone: 30 epochs, batch 512, lr 0.2, class-aware (cls_crt.yaml)
Each stage resumes by itself. Best epochs are selected on val, and val is reported (no labeled test split).

    accelerate launch recipes/ssp_inat.py --data DATA --out RUN

Every stage's lr scales linearly with its global batch from the paper's (lr x batch / reference batch).
cRT starts from ce_uniform's best-val epoch (backbone_best.pt), as the paper's code.
Departures from the paper's code: bf16 autocast, channels_last, FFCV (throughput).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import CRT_INAT, INAT  # noqa: E402
from ssp_imagenet_lt import stages  # noqa: E402

from fasttrain.chain import run_chain  # noqa: E402
from fasttrain.entry import run_main  # noqa: E402

STAGES = stages(INAT, CRT_INAT)

if __name__ == "__main__":
    run_main(run_chain, STAGES, __doc__)
