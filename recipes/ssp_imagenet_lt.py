"""Self-supervised pre-training on ImageNet-LT, then the supervised methods from that backbone, with the
paper's settings (pretrain_moco.py, config/ImageNet_LT/*.yaml):
  moco         MoCo v2, 200 epochs, batch 128, lr 0.015, wd 1e-4, cosine (queue 65536, m 0.999, T 0.2, MLP)
  ce_uniform   CE, uniform sampling, 90 epochs, batch 128, lr 0.2, wd 5e-4, cosine (feat_uniform.yaml)
  ce_balanced  the same with class-aware sampling, 4 images per class in a row (feat_balance.yaml)
  crt          cRT on the ce_uniform backbone: 10 epochs, batch 512, lr 0.2, class-aware (cls_crt.yaml)
Each stage lives in RUN/<stage>; the same command resumes whichever stage was interrupted. Supervised stages
select their best epoch on val and report test (final and best-val epoch) in metrics.json.

    accelerate launch recipes/ssp_imagenet_lt.py --data DATA --out RUN [--stages moco,ce_uniform]
        [--set moco.batch_size=1024]

Every stage's lr scales linearly with its global batch from the paper's (lr x batch / reference batch).
cRT starts from ce_uniform's best-val epoch (backbone_best.pt), as the paper's code. Supervised training crops
use colour jitter 0.4 as the paper's ImageNet-LT transform.
Departures from the paper's code: bf16 autocast, channels_last, FFCV (throughput); the jitter's factors are
applied in a fixed order (torchvision: random).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import CLASS_AWARE, CRT_IMAGENET_LT, IMAGENET_LT, MOCO  # noqa: E402

from fasttrain.chain import Stage, run_chain  # noqa: E402
from fasttrain.entry import run_main  # noqa: E402

SSP = "{root}/moco/backbone.pt"


def stages(feature: dict, crt: dict) -> list[Stage]:
    return [
        Stage("moco", MOCO),
        Stage("ce_uniform", dict(feature, pretrained=SSP)),
        Stage("ce_balanced", dict(feature, **CLASS_AWARE, pretrained=SSP)),
        Stage("crt", dict(crt, pretrained="{root}/ce_uniform/backbone_best.pt")),
    ]


STAGES = stages(IMAGENET_LT, CRT_IMAGENET_LT)

if __name__ == "__main__":
    run_main(run_chain, STAGES, __doc__)
