"""Semi-supervised self-training (Yang & Xu 2020, sec. 3; their `gen_pseudolabels.py` + `train_semi.py`):
a base classifier trained on the labeled long-tailed set pseudo-labels the unlabeled pool, then a model is
trained on labeled + pseudo-labeled data with the same supervised loss:

    pseudo_label(base_run, data, out)             # -> out/pseudo_labels.npz (argmax of the base model)
    --method self_training --pseudo-labels out/pseudo_labels.npz

Each step's batch is a labeled part (the engine's loader, (1 - pseudo_share) of the per-process batch)
and a pseudo-labeled part (the rest), and the loss is L(labeled) + pseudo_weight * L(pseudo) with L the
configured loss (CE / Focal / LDAM / ..., re-weighting included). As in the paper's code, class counts
for the loss (LDAM margins, class-balanced weights) are the labeled plus the pseudo-labeled counts.
The pool's true labels (`unlabeled.true_labels.npy`) are never read here.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..data import build_loader
from ..dataset import DatasetDir, DatasetError
from ..models import build_model
from .base import Method
from .supervised import Supervised

PSEUDO_FILE = "pseudo_labels.npz"


def load_classifier(run: Path) -> tuple[torch.nn.Module, Config]:
    """The classifier of a finished run (`RUN/model.pt`, written by the engine) and the run's config."""
    path = run / "model.pt"
    if not path.is_file() or not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run}: no model.pt / config.yaml; pseudo-labels need a finished supervised run")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("method") in ("rotation", "moco"):
        raise ValueError(f"{run} is a {saved['method']} (self-supervised) run, not a classifier; pseudo-label "
                         f"with a supervised run")
    model = build_model(saved["arch"], saved["num_classes"], in_channels=saved["in_channels"],
                        width=saved["width"], head=saved["head"])
    model.load_state_dict(saved["state_dict"])
    return model, Config.load(run / "config.yaml")


@torch.no_grad()
def pseudo_label(base_run: Path, data: Path, out: Path, *, loader: str = "ffcv", batch_size: int = 512,
                 threshold: float = 0.0, accelerator=None, workers: int = 0) -> Path:
    """Label every sample of the `unlabeled` split of `data` with the base run's classifier and write
    `out/pseudo_labels.npz` (temp name + rename), per position: `position`, `source_index`, `label`
    (argmax), `confidence` (max softmax; LDAM models: softmax of scale * logits, their training softmax);
    plus `threshold` (self-training keeps samples with confidence >= the larger of it and
    --pseudo-threshold) and the `base_run` and `data` used. With an accelerator, each rank labels its
    evaluation block (`batch_size` per process) and the main process writes the file. Returns its path."""
    base_run, out = Path(base_run), Path(out)
    dataset = DatasetDir(data)
    if not dataset.has_split("unlabeled"):
        raise DatasetError(f"{dataset.root}: no 'unlabeled' split to pseudo-label; convert the dataset with an "
                           f"unlabeled pool (data_prep.convert --unlabeled-factor ...)")
    model, cfg = load_classifier(base_run)
    if model.fc.out_features != dataset.num_classes:
        raise ValueError(f"{base_run}: its classifier has {model.fc.out_features} outputs but {dataset.root} has "
                         f"{dataset.num_classes} classes; pseudo-label with a supervised run on this dataset")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = build_loader(dataset, "unlabeled", kind=loader, batch_size=batch_size,
                           views=Method(cfg, dataset).views(train=False), train=False, rank=rank, world_size=world,
                           device=device, workers=workers)
    model.to(device).eval()
    scale = cfg.ldam_scale if cfg.loss == "ldam" else 1.0
    empty = torch.empty(0, dtype=torch.long, device=device)
    parts = [(empty, empty.float(), empty)]   # (label, confidence, source index) per batch
    with accelerator.autocast() if accelerator else nullcontext():
        for batch in batches:
            confidence, label = (scale * model(batch.images).float()).softmax(1).max(1)
            parts.append((label, confidence, batch.indices))
    label, confidence, source_index = (_gather_blocks(torch.cat(t), accelerator) for t in zip(*parts))

    split = dataset.split("unlabeled")
    if not np.array_equal(source_index, split.source_index):
        raise RuntimeError(f"loader {loader!r} did not yield the unlabeled split in position order")
    path = out / PSEUDO_FILE
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{PSEUDO_FILE}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, position=np.arange(split.num_samples), source_index=source_index, label=label,
                     confidence=confidence.astype(np.float32), threshold=np.float32(threshold),
                     base_run=str(base_run.resolve()), data=str(dataset.root.resolve()))
        os.replace(tmp, path)
    if accelerator:
        accelerator.wait_for_everyone()
    return path


def _gather_blocks(local: torch.Tensor, accelerator) -> np.ndarray:
    """Every rank's evaluation block (contiguous, rank order, sizes may differ by one) -> the whole split."""
    if accelerator is None or accelerator.num_processes == 1:
        return local.cpu().numpy()
    sizes = accelerator.gather(torch.tensor([len(local)], device=local.device)).tolist()
    padded = accelerator.gather(accelerator.pad_across_processes(local, dim=0)).view(len(sizes), -1)
    return torch.cat([block[:n] for block, n in zip(padded, sizes)]).cpu().numpy()


def read_pseudo_labels(path: str, dataset: DatasetDir) -> dict[str, np.ndarray]:
    """`pseudo_labels.npz`, checked against the dataset's unlabeled split."""
    if not path:
        raise ValueError("method 'self_training' needs --pseudo-labels PATH/pseudo_labels.npz, written by "
                         "fasttrain.methods.self_training.pseudo_label from a supervised run on this dataset")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--pseudo-labels {path}: no such file")
    split = dataset.split("unlabeled")
    with np.load(path) as z:
        table = {k: z[k] for k in ("source_index", "label", "confidence", "threshold")}
    if len(table["label"]) != split.num_samples or not np.array_equal(table["source_index"], split.source_index):
        raise DatasetError(f"--pseudo-labels {path}: {len(table['label'])} rows that do not match the "
                           f"{split.num_samples} samples of the unlabeled split of {dataset.root}; were they "
                           f"made for another dataset? Re-run pseudo_label on this one")
    if table["label"].min(initial=0) < 0 or table["label"].max(initial=0) >= dataset.num_classes:
        raise DatasetError(f"--pseudo-labels {path}: labels outside 0..{dataset.num_classes - 1}")
    return table


class SelfTraining(Supervised):
    """Joint training on labeled + pseudo-labeled data; any loss, re-weighting, sampler and loader."""
    name = "self_training"

    def batch_size(self, per_process: int) -> int:
        labeled = round(per_process * (1 - self.cfg.pseudo_share))
        if not 0 < labeled < per_process:
            raise ValueError(f"--pseudo-share {self.cfg.pseudo_share} splits the per-process batch of {per_process} "
                             f"into {labeled} labeled + {per_process - labeled} pseudo-labeled images; "
                             f"both parts need at least one")
        return labeled

    def setup(self, engine) -> None:
        cfg, num_classes = self.cfg, self.dataset.num_classes
        table = read_pseudo_labels(cfg.pseudo_labels, self.dataset)
        threshold = max(cfg.pseudo_threshold, float(table["threshold"]))
        keep = np.flatnonzero(table["confidence"] >= threshold)
        per_process = engine.per_process_batch
        pseudo_batch = per_process - self.batch_size(per_process)
        if len(keep) < pseudo_batch * engine.accelerator.num_processes:
            raise ValueError(f"--pseudo-labels {cfg.pseudo_labels}: {len(keep)} samples with confidence >= "
                             f"{threshold}, too few for one pseudo-labeled batch of {pseudo_batch} per process; "
                             f"lower --pseudo-threshold or --pseudo-share")
        counts = (np.asarray(self.dataset.split(cfg.train_split).class_counts)
                  + np.bincount(table["label"][keep], minlength=num_classes))
        self.criterion = self.build_criterion(counts, engine.device)
        self.pseudo_loader = engine.build_loader("unlabeled", views=self.views(train=True), train=True,
                                                 sampler=cfg.sampler, batch_size=pseudo_batch,
                                                 sampling_labels=table["label"], positions=keep)
        order = np.argsort(table["source_index"])   # the Batch yields source indices: look them up sorted
        self.pseudo_index = torch.as_tensor(table["source_index"][order], device=engine.device)
        self.pseudo_label = torch.as_tensor(table["label"][order], device=engine.device)
        self.epoch, self.passes, self.stream = None, 0, iter(())
        engine.log(f"self-training: {len(keep)} of {len(table['label'])} pseudo-labels with confidence >= "
                   f"{threshold}; batch {per_process - pseudo_batch} labeled + {pseudo_batch} pseudo-labeled")

    def next_pseudo_batch(self, epoch: int):
        """The pseudo-labeled stream of `epoch`: pass p of it has loader epoch `epoch + p * cfg.epochs`, a
        pure function of the epoch (a resumed run draws the same batches); exhausted -> next pass."""
        if epoch != self.epoch:
            self.epoch, self.passes, self.stream = epoch, 0, iter(())
        batch = next(self.stream, None)
        if batch is None:
            self.pseudo_loader.set_epoch(epoch + self.passes * self.cfg.epochs)
            self.passes += 1
            self.stream = iter(self.pseudo_loader)
            batch = next(self.stream)
        return batch

    def pseudo_targets(self, indices: torch.Tensor) -> torch.Tensor:
        return self.pseudo_label[torch.searchsorted(self.pseudo_index, indices)]

    def loss(self, model, batch, epoch):
        pseudo = self.next_pseudo_batch(epoch)
        n = len(batch)
        logits = model(torch.cat([batch.images, pseudo.images]))
        labeled = self.criterion(logits[:n], batch.labels, epoch)
        pseudo_loss = self.criterion(logits[n:], self.pseudo_targets(pseudo.indices), epoch)
        loss = labeled + self.cfg.pseudo_weight * pseudo_loss
        return loss, {"loss": loss.detach(), "loss_labeled": labeled.detach(), "loss_pseudo": pseudo_loss.detach()}
