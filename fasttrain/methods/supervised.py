"""Supervised long-tail training (CE / Focal / LDAM / Balanced Softmax / LA, with CB or DRW re-weighting),
and cRT: classifier re-training on a frozen backbone."""
from __future__ import annotations

from torch import nn

from ..losses import build_loss
from .base import Method


class Supervised(Method):
    name = "supervised"

    def setup(self, engine) -> None:
        self.criterion = self.build_criterion(self.dataset.split(self.cfg.train_split).class_counts, engine.device)

    def build_criterion(self, class_counts, device):
        """The configured long-tail loss; `class_counts` set LDAM margins and class-balanced weights."""
        cfg = self.cfg
        if cfg.head == "cosine" and cfg.loss != "ldam":
            raise ValueError(f"--head cosine gives cosines in [-1, 1] that only LDAM scales (x{cfg.ldam_scale}); "
                             f"use --head linear with --loss {cfg.loss}, or --loss ldam")
        return build_loss(cfg.loss, class_counts, reweight=cfg.reweight, drw_epoch=cfg.schedule_epochs()["drw"],
                          cb_beta=cfg.cb_beta, focal_gamma=cfg.focal_gamma, ldam_max_margin=cfg.ldam_max_margin,
                          ldam_scale=cfg.ldam_scale, la_tau=cfg.la_tau).to(device)

    def loss(self, model, batch, epoch):
        loss = self.criterion(model(batch.images), batch.labels, epoch)
        return loss, {"loss": loss.detach()}


class ClassifierRetraining(Supervised):
    """cRT (Kang et al. 2020): backbone from `--pretrained` with its parameters frozen; a fresh classifier is
    trained, usually with the class-aware sampler. As in the paper's code every module is in train() mode, so
    the backbone's BatchNorm running statistics keep updating; `--crt-freeze-bn true` keeps them frozen
    (backbone in eval() mode)."""
    name = "crt"

    def build_model(self) -> nn.Module:
        if not self.cfg.pretrained:
            raise ValueError("method 'crt' re-trains the classifier of a trained backbone: give --pretrained "
                             "RUN/backbone.pt (the output of a supervised or SSP run)")
        model = super().build_model()
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("fc.")
        return model

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        if self.cfg.crt_freeze_bn:
            model.eval()
            _unwrap(model).fc.train()


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)
