"""The paper's hyper-parameters, shared by the recipes: what the released code of Yang & Xu 2020 does
(train.py / utils.py for CIFAR-LT, imagenet_inat/config/*.yaml for ImageNet-LT and iNaturalist 2018,
pretrain_moco.py for MoCo v2). Recipes import these; command-line flags override any value.

Schedules are positions in the run (fractions of --epochs), so `--epochs 20` keeps the paper's shape; give
--warmup-epochs / --milestone-epochs / --drw-epoch for absolute epochs. The batch size is global (all
processes); where `lr_ref_batch` is set, the lr is given at that batch and scales linearly with --batch-size
(and --grad-accum), so the paper's setting is the default and a bigger batch keeps lr / batch.
"""

# CIFAR-10/100-LT, SVHN-LT, Fashion-MNIST-LT (utils.adjust_learning_rate, train.py): ResNet-32, 200 epochs,
# SGD lr 0.1, batch 128, wd 2e-4; 1-based epoch e: e <= 5: lr * e / 5, e > 160: x0.01, e > 180: x0.0001;
# DRW from 0-based epoch 160. As fractions: warm-up 5/200, milestones 160/200 and 180/200, DRW at 160/200.
CIFAR = dict(arch="resnet32", epochs=200, batch_size=128, lr=0.1, momentum=0.9, weight_decay=2e-4,
             schedule="step", warmup=0.025, milestones=[0.8, 0.9], milestone_factors=[0.01, 0.0001],
             lr_update="epoch_end", drw_at=0.8, loader="device")
LDAM_DRW = dict(loss="ldam", reweight="drw")          # --head auto: the cosine head, as train.py with LDAM
DRW = dict(loss="ce", reweight="drw")
# train.py --train_rule Resample (utils.ImbalancedDatasetSampler): every sample weighted by its class's
# (1 - 0.9999) / (1 - 0.9999^n_c), drawn with replacement (not class-uniform: that is --sampler balanced).
RESAMPLE = dict(loss="ce", sampler="resample", cb_beta=0.9999)

# Rotation pre-training on the labeled long-tailed set (same optimiser and schedule).
ROTATION = dict(CIFAR, method="rotation")

# ImageNet-LT feature learning (config/ImageNet_LT/feat_uniform.yaml): ResNet-50, 90 epochs, batch 128,
# SGD lr 0.2 momentum 0.9, wd 5e-4, cosine to 0 stepped once per epoch (epoch e trains at lr(e/90));
# RandomResizedCrop 224 + flip + ColorJitter(0.4, 0.4, 0.4, 0); eval resize 256, center crop 224.
# bf16 + channels_last + FFCV are this project's throughput choices (the paper's code trains in fp32).
IMAGENET_LT = dict(arch="resnet50", epochs=90, batch_size=128, lr=0.2, lr_ref_batch=128, momentum=0.9,
                   weight_decay=5e-4, schedule="cosine", warmup=0.0, lr_update="epoch_end", loader="ffcv",
                   image_size=224, eval_size=224, color_jitter=0.4, precision="bf16", channels_last=True)
# iNaturalist 2018 feature learning (config/iNaturalist18/feat_unifrom.yaml): batch 100, wd 1e-4, no colour
# jitter (the paper's iNaturalist transform has none).
INAT = dict(IMAGENET_LT, batch_size=100, lr_ref_batch=100, weight_decay=1e-4, color_jitter=0.0)

# Class-aware sampling, 4 images of a class in a row (data/ClassAwareSampler.py, num_samples_cls 4): the
# balanced feature learning of ImageNet-LT (feat_balance.yaml) and every cRT stage.
CLASS_AWARE = dict(sampler="class_aware", samples_per_class=4)

# cRT (config/*/cls_crt.yaml): backbone frozen (BN statistics keep updating), new classifier, batch 512,
# lr 0.2, cosine; 10 epochs on ImageNet-LT (wd 5e-4), 30 on iNaturalist 2018 (wd 1e-4).
CRT_IMAGENET_LT = dict(IMAGENET_LT, **CLASS_AWARE, method="crt", epochs=10, batch_size=512, lr_ref_batch=512)
CRT_INAT = dict(INAT, **CLASS_AWARE, method="crt", epochs=30, batch_size=512, lr_ref_batch=512)

# MoCo v2 pre-training (pretrain_moco.py): 200 epochs, batch 128, lr 0.015, wd 1e-4, cosine stepped at the
# start of each epoch (epoch e trains at lr((e-1)/200)); queue 65536, momentum 0.999, T 0.2, MLP head.
MOCO = dict(IMAGENET_LT, color_jitter=0.0, method="moco", epochs=200, batch_size=128, lr=0.015, lr_ref_batch=128,
            weight_decay=1e-4, schedule="cosine", lr_update="epoch_start", moco_queue=65536, moco_momentum=0.999,
            moco_temperature=0.2, moco_mlp=True)


# Self-training's joint stage (train_semi.py): the CIFAR recipe at batch 256, on labeled + pseudo-labeled data.
SEMI = dict(CIFAR, batch_size=256)
