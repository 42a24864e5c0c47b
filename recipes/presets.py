"""The paper's hyper-parameters, shared by the recipes (Yang & Xu 2020, and the LDAM-DRW / Decoupling /
MoCo v2 code they build on). Recipes import these; command-line flags override any value."""

# CIFAR-10/100-LT, SVHN-LT, Fashion-MNIST-LT: ResNet-32, 200 epochs, lr x0.01 at 160 and x0.0001 at 180.
CIFAR = dict(arch="resnet32", epochs=200, batch_size=128, lr=0.1, momentum=0.9, weight_decay=2e-4,
             schedule="step", warmup_epochs=5, milestones=[160, 180], milestone_factors=[0.01, 0.0001],
             loader="device", drw_epoch=160)
LDAM_DRW = dict(loss="ldam", head="cosine", reweight="drw")
DRW = dict(loss="ce", reweight="drw")
CE_BALANCED = dict(loss="ce", sampler="balanced")

# Rotation pre-training on the labeled long-tailed set (same optimiser and schedule).
ROTATION = dict(CIFAR, method="rotation")

# ImageNet-LT / iNaturalist 2018: ResNet-50, 90 epochs, cosine, lr 0.2 at batch 512 (scaled linearly).
IMAGENET = dict(arch="resnet50", epochs=90, batch_size=512, lr=0.2, lr_ref_batch=512, momentum=0.9,
                weight_decay=5e-4, schedule="cosine", warmup_epochs=0, loader="ffcv", image_size=224,
                eval_size=224, precision="bf16", channels_last=True)
CRT = dict(IMAGENET, method="crt", epochs=10, sampler="balanced")

# MoCo v2 pre-training: queue 65536, momentum 0.999, T 0.2, MLP head, cosine lr 0.015 at batch 128.
MOCO = dict(IMAGENET, method="moco", epochs=200, batch_size=256, lr=0.015, lr_ref_batch=128, weight_decay=1e-4,
            moco_queue=65536, moco_momentum=0.999, moco_temperature=0.2, moco_mlp=True)

# Self-training's joint stage (train_semi.py): the CIFAR recipe at batch 256, on labeled + pseudo-labeled data.
SEMI = dict(CIFAR, batch_size=256)
