"""MoCo v2 (He et al., CVPR 2020; Chen et al., arXiv:2003.04297), the self-supervised pre-training (SSP)
that Yang & Xu 2020 use on ImageNet-LT and iNaturalist 2018 (their `pretrain_moco.py`, from the official
MoCo code): a query encoder (the backbone + an MLP projection head), a key encoder that is a momentum copy
of it (m = 0.999, no gradient), a queue of 65,536 L2-normalised keys as negatives, InfoNCE at temperature
0.2 with the positive at index 0, and shuffling BN (the keys' BatchNorm statistics come from another
sub-batch than the queries', so the model cannot use them to spot the positive).

Paper defaults: ResNet-50, SGD momentum 0.9, wd 1e-4, lr 0.015 at batch 128 (scaled linearly), cosine
schedule, 200 epochs, MoCo v2 augmentation (recipes/presets.py: MOCO). The exported `backbone.pt` is the
query encoder without its projection head, with torchvision names: any supervised run starts from it with
`--pretrained RUN/backbone.pt`.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..data import augment
from ..models import build_model
from ..models.checkpoint import save_backbone
from .base import Method


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` (same shape on all ranks), concatenated in rank order; no gradient."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


class MoCoModel(nn.Module):
    """encoder_q, encoder_k and the queue in one module, so that the engine's optimiser, accelerate's
    prepare (DDP) and checkpoints handle all of it (the queue and its pointer are buffers).

    `forward(im_q, im_k)` returns the InfoNCE logits (N, 1 + queue_size) / temperature, the positive in
    column 0, and then enqueues the keys of the global batch (all ranks). `momentum_update()` moves the
    key encoder towards the query encoder; call it after each optimiser step."""

    def __init__(self, encoder: nn.Module, dim: int, *, queue_size: int = 65536, momentum: float = 0.999,
                 temperature: float = 0.2, shuffle_groups: int = 8):
        super().__init__()
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder).requires_grad_(False)   # no grad: DDP ignores it
        self.momentum, self.temperature, self.shuffle_groups = momentum, temperature, shuffle_groups
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
        q = F.normalize(self.encoder_q(im_q).float(), dim=1)
        with torch.no_grad():
            k, k_all = self.keys(im_k)
        with torch.autocast(q.device.type, enabled=False):   # similarities / 0.2 in float32
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.clone().T], 1) / self.temperature
        self.enqueue(k_all)
        return logits

    @torch.no_grad()
    def keys(self, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised keys of this rank's images, and of the global batch (rank order), with shuffling BN:
        across ranks when distributed (the official MoCo code), else over `shuffle_groups` sub-batches of
        a random permutation of the batch, each forwarded on its own."""
        world = _world()
        if world > 1:
            everything = _gather(im_k)
            perm = torch.randperm(len(everything), device=im_k.device)
            dist.broadcast(perm, src=0)
            mine = everything[perm.view(world, -1)[dist.get_rank()]].contiguous(memory_format=_layout(im_k))
            k_all = _gather(F.normalize(self.encoder_k(mine).float(), dim=1))[perm.argsort()]
            return k_all.view(world, len(im_k), -1)[dist.get_rank()], k_all
        if self.shuffle_groups <= 1:
            k = F.normalize(self.encoder_k(im_k).float(), dim=1)
            return k, k
        perm = torch.randperm(len(im_k), device=im_k.device)
        k = torch.cat([self.encoder_k(part) for part in im_k[perm].tensor_split(self.shuffle_groups)])
        k = F.normalize(k.float(), dim=1)[perm.argsort()]
        return k, k

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest keys: queue[ptr : ptr + n] = keys (modulo the size); no host sync."""
        size = len(self.queue)
        rows = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """encoder_k <- m * encoder_k + (1 - m) * encoder_q (parameters; the BN buffers stay the key's)."""
        k, q = list(self.encoder_k.parameters()), list(self.encoder_q.parameters())
        torch._foreach_mul_(k, self.momentum)
        torch._foreach_add_(k, q, alpha=1 - self.momentum)


class MoCo(Method):
    name = "moco"
    evaluates = False

    def num_outputs(self) -> int:
        return self.cfg.moco_dim

    def views(self, train: bool) -> list[augment.ViewSpec]:
        """Two MoCo v2 views per image (raw small sets: at the images' own size)."""
        if not train:
            return super().views(train)
        size = int(self.dataset.image["height"]) if self.dataset.is_raw else self.cfg.image_size
        return [augment.moco_v2(size), augment.moco_v2(size)]

    def build_model(self) -> nn.Module:
        """The query encoder with a linear projection (whatever --head says), its key copy and the queue."""
        cfg = self.cfg
        encoder = build_model(cfg.arch, cfg.moco_dim, in_channels=self.dataset.channels, width=cfg.width)
        if cfg.moco_mlp:   # MoCo v2: fc = Linear(D, D) - ReLU - Linear(D, dim)
            encoder.fc = nn.Sequential(nn.Linear(encoder.feature_dim, encoder.feature_dim), nn.ReLU(), encoder.fc)
        return MoCoModel(encoder, cfg.moco_dim, queue_size=cfg.moco_queue, momentum=cfg.moco_momentum,
                         temperature=cfg.moco_temperature, shuffle_groups=cfg.moco_shuffle_groups)

    def trainable_parameters(self, model: nn.Module):
        return list(model.encoder_q.parameters())

    def setup(self, engine) -> None:
        cfg, acc = self.cfg, engine.accelerator
        global_batch = engine.per_process_batch * acc.num_processes
        if cfg.moco_queue % global_batch:
            raise ValueError(f"--moco-queue {cfg.moco_queue} must be a multiple of the global batch "
                             f"{global_batch} (per process {engine.per_process_batch} x {acc.num_processes} "
                             f"processes), e.g. {max(1, cfg.moco_queue // global_batch) * global_batch}")
        if acc.num_processes == 1 and engine.per_process_batch < 2 * cfg.moco_shuffle_groups:
            raise ValueError(f"--moco-shuffle-groups {cfg.moco_shuffle_groups}: the batch of "
                             f"{engine.per_process_batch} gives sub-batches of < 2 images for BatchNorm; "
                             f"use at most {engine.per_process_batch // 2} groups (1 = no shuffling)")
        self.moco = acc.unwrap_model(engine.model)

    def loss(self, model, batch, epoch):
        logits = model(batch.views[0], batch.views[1])
        targets = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, targets)
        accuracy = (logits.detach().argmax(1) == 0).float().mean()
        return loss, {"loss": loss.detach(), "infonce_acc": accuracy}

    def after_step(self, model) -> None:
        self.moco.momentum_update()

    def export(self, model, run_dir) -> None:
        save_backbone(model.encoder_q, run_dir / "backbone.pt")
