"""The plug-in interface between a training method and the engine (see DESIGN.md, "Methods").

The engine owns the loop, the loaders, the optimiser, checkpoints and evaluation. A method says which
views the loader must yield, which module is trained, and what one step's loss is.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..data import augment
from ..dataset import DatasetDir
from ..models import build_model, head_for
from ..models.checkpoint import save_backbone

if TYPE_CHECKING:
    from ..config import Config
    from ..data.batch import Batch
    from ..engine import Engine


class Method:
    name = "base"
    evaluates = True          # classification evaluation on the test/val split

    def __init__(self, cfg: "Config", dataset: DatasetDir):
        self.cfg, self.dataset = cfg, dataset

    # --- what the engine builds -------------------------------------------------------------
    def num_outputs(self) -> int:
        return self.dataset.num_classes

    def build_model(self) -> nn.Module:
        return build_model(self.cfg.arch, self.num_outputs(), in_channels=self.dataset.channels,
                           width=self.cfg.width, head=head_for(self.cfg.head, self.cfg.loss))

    def views(self, train: bool) -> list[augment.ViewSpec]:
        if self.dataset.is_raw:
            return [augment.small_train() if train else augment.small_eval()]
        if not train:
            return [augment.large_eval(self.cfg.eval_size)]
        view, j = augment.large_train(self.cfg.image_size), self.cfg.color_jitter
        return [dataclasses.replace(view, jitter=(j, j, j, 0.0), jitter_p=1.0) if j > 0 else view]

    def trainable_parameters(self, model: nn.Module):
        return [p for p in model.parameters() if p.requires_grad]

    # --- hooks ------------------------------------------------------------------------------
    def setup(self, engine: "Engine") -> None:
        """Called once the model is prepared: build extra loaders, move buffers to the device."""

    def train_mode(self, model: nn.Module) -> None:
        model.train()

    def loss(self, model: nn.Module, batch: "Batch", epoch: int) -> tuple[torch.Tensor, dict]:
        raise TypeError(f"method {self.name!r} does not define a training loss")

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step (e.g. MoCo's momentum update)."""

    def export(self, model: nn.Module, run_dir: Path) -> None:
        """Called on the main process at the end: the backbone, for later stages (`--pretrained`)."""
        save_backbone(model, run_dir / "backbone.pt")
