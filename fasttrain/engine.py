"""The training engine: one loop for every method (supervised, cRT, rotation, MoCo).

    engine = Engine(cfg)       # accelerator, data, method, model, optimiser, loaders
    status = engine.fit()      # "done" | "stopped" (after --stop-after-epochs)

Runs under `python` (one process, CPU or one GPU) and `accelerate launch` (N GPUs / machines).
Checkpoints are `accelerator.save_state` directories written under a temporary name and renamed, so a
run killed at any moment resumes from its last complete epoch.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .config import Config
from .data import build_loader
from .dataset import DatasetDir, DatasetError
from .evaluate import evaluate, write_report
from .methods import method_class
from .models import load_pretrained

CHECKPOINT_FORMAT = 1


class Engine:
    def __init__(self, cfg: Config):
        if not cfg.out:
            raise ValueError("give a run directory with --out RUN_DIR")
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.accelerator = Accelerator(mixed_precision=cfg.precision, gradient_accumulation_steps=cfg.grad_accum,
                                       step_scheduler_with_optimizer=False)
        acc = self.accelerator
        self.device = acc.device
        self.is_main = acc.is_main_process
        if cfg.batch_size % acc.num_processes:
            raise ValueError(f"--batch-size {cfg.batch_size} (global) is not divisible by the "
                             f"{acc.num_processes} processes")
        self.per_process_batch = cfg.batch_size // acc.num_processes
        set_seed(cfg.seed)

        self.dataset = DatasetDir(cfg.data)
        self.method = method_class(cfg.method)(cfg, self.dataset)
        model = self.method.build_model()
        if cfg.pretrained:
            report = load_pretrained(model, cfg.pretrained)
            self.log(f"loaded {report.loaded} tensors from {cfg.pretrained}; head re-initialised; "
                     f"missing {report.missing or 'none'}; unexpected {report.unexpected or 'none'}")
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(cfg, self.method.trainable_parameters(model))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if cfg.compile:
            self.model = torch.compile(self.model)

        # Loaders shard themselves per rank: they are never passed to accelerator.prepare.
        self.train_loader = self.build_loader(cfg.train_split, views=self.method.views(train=True), train=True,
                                              sampler=cfg.sampler,
                                              batch_size=self.method.batch_size(self.per_process_batch))
        if len(self.train_loader) == 0:
            raise DatasetError(f"{cfg.data}: split {cfg.train_split!r} gives no full batch of "
                               f"{self.per_process_batch} per process; lower --batch-size")
        self.eval_split = cfg.eval_split or self.dataset.eval_split()
        self.eval_loader = (self.build_loader(self.eval_split, views=self.method.views(train=False), train=False)
                            if self.method.evaluates else None)
        self.method.setup(self)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum)
        self.state = {"epoch": 0, "step": 0, "best_top1": None, "best_epoch": None}

    # ------------------------------------------------------------------------------------------
    def build_loader(self, split: str, *, views, train: bool, sampler: str = "uniform", batch_size: int | None = None,
                     sampling_labels=None, positions=None):
        acc = self.accelerator
        return build_loader(self.dataset, split, kind=self.cfg.loader, batch_size=batch_size or self.per_process_batch,
                            views=views, train=train, sampler=sampler, sampling_labels=sampling_labels,
                            positions=positions, seed=self.cfg.seed, rank=acc.process_index,
                            world_size=acc.num_processes, device=self.device, channels_last=self.cfg.channels_last,
                            workers=self.cfg.workers)

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(f"[fasttrain] {message}")

    def lr_at(self, epoch: float) -> float:
        """Learning rate at a fractional epoch: linear warm-up, then step / cosine / constant."""
        cfg, base = self.cfg, self.cfg.effective_lr()
        if epoch < cfg.warmup_epochs:
            return base * (epoch + 1 / self.steps_per_epoch) / cfg.warmup_epochs
        if cfg.schedule == "cosine":
            t = (epoch - cfg.warmup_epochs) / max(1e-8, cfg.epochs - cfg.warmup_epochs)
            return base * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if cfg.schedule == "step":
            factor = 1.0
            for milestone, f in zip(cfg.milestones, cfg.milestone_factors):
                if epoch >= milestone:
                    factor = f
            return base * factor
        if cfg.schedule == "constant":
            return base
        raise ValueError(f"unknown --schedule {cfg.schedule!r}; valid: step, cosine, constant")

    # ------------------------------------------------------------------------------------------
    def fit(self) -> str:
        cfg, acc = self.cfg, self.accelerator
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.yaml")
        acc.wait_for_everyone()
        started = (self.run_dir / "checkpoints").exists() or (self.run_dir / "DONE").exists()
        if started and not cfg.resume:
            raise FileExistsError(f"{self.run_dir} already holds a run; continue it with --resume {self.run_dir} "
                                  f"or choose a new --out")
        if (self.run_dir / "DONE").exists():
            self.log(f"{self.run_dir} is already complete (DONE); nothing to do")
            return "done"
        if cfg.resume:
            self.resume()
        first = self.state["epoch"]
        self.log(f"{cfg.method} | {cfg.arch} | {acc.num_processes} process(es) on {self.device} | "
                 f"{len(self.train_loader)} batches/epoch | epochs {first}..{cfg.epochs - 1} | loader {cfg.loader}")
        for epoch in range(first, cfg.epochs):
            logs = self.train_epoch(epoch)
            last = epoch == cfg.epochs - 1
            if self.eval_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
                metrics = self.evaluate(epoch)
                logs.update({f"eval_{k}": metrics[k] for k in ("top1", "top5", "many", "medium", "few")})
                best = self.state["best_top1"]
                if best is None or metrics["top1"] > best:
                    self.state.update(best_top1=metrics["top1"], best_epoch=epoch)
                    self.state["epoch"] = epoch + 1
                    self.save_checkpoint("best")
            self.state["epoch"] = epoch + 1
            self.write_jsonl(logs | {"epoch": epoch})
            self.save_checkpoint("last")
            if cfg.stop_after_epochs and epoch + 1 - first >= cfg.stop_after_epochs and not last:
                self.log(f"stopped after {cfg.stop_after_epochs} epoch(s) at epoch {epoch + 1}/{cfg.epochs}; "
                         f"continue with --resume {self.run_dir}")
                return "stopped"
        self.finish()
        return "done"

    def train_epoch(self, epoch: int) -> dict:
        cfg, acc, model = self.cfg, self.accelerator, self.model
        self.train_loader.set_epoch(epoch)
        self.method.train_mode(model)
        n = len(self.train_loader)
        sums: dict[str, torch.Tensor] = {}
        images, t0 = 0, time.perf_counter()
        bar = tqdm(total=n, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not self.is_main, leave=False,
                   dynamic_ncols=True)
        for i, batch in enumerate(self.train_loader):
            lr = self.lr_at(epoch + i / n)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with acc.accumulate(model):
                loss, logs = self.method.loss(model, batch, epoch)
                acc.backward(loss)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                self.method.after_step(model)
                self.state["step"] += 1
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            images += self.per_process_batch
            if (i + 1) % cfg.log_every == 0 or i + 1 == n:
                bar.set_postfix(loss=f"{(sums['loss'] / (i + 1)).item():.4f}", lr=f"{lr:.4g}")
            bar.update(1)
        bar.close()
        self.sync_buffers()
        seconds = time.perf_counter() - t0
        means = {k: (acc.reduce(v / n, "mean") if acc.num_processes > 1 else v / n).item() for k, v in sums.items()}
        means.update(lr=lr, seconds=seconds, train_images_per_s=images * acc.num_processes / seconds)
        self.log(f"epoch {epoch + 1}/{cfg.epochs} " + " ".join(f"{k} {v:.4g}" for k, v in means.items()))
        return means

    def sync_buffers(self) -> None:
        """Average the BatchNorm running statistics over ranks. DDP only broadcasts rank 0's
        buffers at the start of a forward, so after an epoch every rank holds its own statistics; without
        this, each rank would evaluate its part of the test set with a slightly different model."""
        if self.accelerator.num_processes == 1:
            return
        for module in self.accelerator.unwrap_model(self.model).modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                for buffer in (module.running_mean, module.running_var):
                    torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
                    buffer /= self.accelerator.num_processes

    def evaluate(self, epoch: int) -> dict:
        counts = self.dataset.shot_counts(self.cfg.train_split)  # labeled counts (self-training)
        metrics, confusion = evaluate(self.accelerator.unwrap_model(self.model), self.eval_loader,
                                      self.dataset.num_classes, counts, self.accelerator,
                                      many=self.cfg.many_threshold, few=self.cfg.few_threshold)
        metrics.update(epoch=epoch, split=self.eval_split)
        self.log(f"eval {self.eval_split}: top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} "
                 f"many {_fmt(metrics['many'])} medium {_fmt(metrics['medium'])} few {_fmt(metrics['few'])}")
        self.last_metrics, self.last_confusion = metrics, confusion
        return metrics

    # ------------------------------------------------------------------------------------------
    def write_jsonl(self, record: dict) -> None:
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def save_checkpoint(self, name: str) -> None:
        """save_state into a temporary directory, then an atomic rename (main process) - all ranks wait."""
        acc = self.accelerator
        final, tmp = self.run_dir / "checkpoints" / name, self.run_dir / "checkpoints" / f".{name}.tmp"
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if self.is_main:
            (tmp / "trainer_state.json").write_text(json.dumps(self.state | {"format": CHECKPOINT_FORMAT}))
            old = final.with_name(f".{name}.old")
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            if old.exists():
                shutil.rmtree(old)
        acc.wait_for_everyone()

    def resume(self) -> None:
        ckpt = self.run_dir / "checkpoints" / "last"
        if not (ckpt / "trainer_state.json").exists():
            self.log(f"--resume {self.run_dir}: no complete checkpoint yet; starting at epoch 0")
            return
        check_checkpoint_shapes(ckpt, self.accelerator.unwrap_model(self.model), self.cfg.data)
        self.accelerator.load_state(str(ckpt))
        self.state.update(json.loads((ckpt / "trainer_state.json").read_text()))
        self.state.pop("format", None)
        self.log(f"resumed {self.run_dir} at epoch {self.state['epoch']} (step {self.state['step']})")

    def finish(self) -> None:
        acc = self.accelerator
        if self.eval_loader is not None and not hasattr(self, "last_metrics"):
            self.evaluate(self.cfg.epochs - 1)  # resumed after the last epoch's checkpoint, before this report
        acc.wait_for_everyone()
        if self.is_main:
            model = acc.unwrap_model(self.model)
            self.method.export(model, self.run_dir)
            torch.save({"arch": self.cfg.arch, "width": self.cfg.width, "head": self.cfg.head,
                        "num_classes": self.method.num_outputs(), "in_channels": self.dataset.channels,
                        "method": self.cfg.method, "state_dict": model.state_dict()}, self.run_dir / "model.pt")
            if self.eval_loader is not None:
                counts = self.dataset.shot_counts(self.cfg.train_split)  # labeled counts (self-training)
                write_report(self.run_dir, self.last_metrics | {"best_top1": self.state["best_top1"],
                                                                "best_epoch": self.state["best_epoch"]},
                             self.last_confusion, counts, self.dataset.class_names)
            (self.run_dir / "DONE").write_text(json.dumps(self.state))
        acc.wait_for_everyone()
        self.log(f"finished {self.run_dir}")


def check_checkpoint_shapes(ckpt: Path, model: torch.nn.Module, data: str) -> None:
    """A clear error (not a wall of size-mismatch text) when a checkpoint does not fit this model/data."""
    files = sorted(ckpt.glob("model*.safetensors")) or sorted(ckpt.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{ckpt}: no model weights in the checkpoint; delete {ckpt} to start over")
    if files[0].suffix == ".safetensors":
        from safetensors.torch import load_file
        saved = load_file(str(files[0]))
    else:
        saved = torch.load(files[0], map_location="cpu", weights_only=True)
    expected = model.state_dict()
    bad = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in saved.items()
           if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        key, got, want = next(((k, g, w) for k, g, w in bad if k.startswith("fc")), bad[0])
        hint = (f"the checkpoint's classifier has {got[0]} classes but the data in {data} has {want[0]}"
                if key.startswith("fc") else "the checkpoint was made with a different architecture")
        raise ValueError(f"cannot resume from {ckpt}: {key} has shape {got}, this model needs {want} "
                         f"({hint}); use a new --out directory or the matching --data")


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    """SGD (fused where the device supports it); NVIDIA apex LAMB/LARS only when installed and asked for."""
    lr = cfg.effective_lr()
    if cfg.optimizer == "sgd":
        kwargs = dict(lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        if torch.cuda.is_available():
            kwargs["fused"] = True
        return torch.optim.SGD(params, **kwargs)
    if cfg.optimizer in ("apex_lamb", "apex_lars"):
        try:
            import apex.optimizers  # noqa: F401  (NVIDIA apex; not on PyPI)
        except ImportError as e:
            raise RuntimeError(f"--optimizer {cfg.optimizer} needs NVIDIA apex, which is not installed (it is not "
                               f"on PyPI: build it from github.com/NVIDIA/apex); or use --optimizer sgd") from e
        if cfg.optimizer == "apex_lamb":
            return apex.optimizers.FusedLAMB(params, lr=lr, weight_decay=cfg.weight_decay)
        from apex.parallel.LARC import LARC
        return LARC(torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay))
    raise ValueError(f"unknown --optimizer {cfg.optimizer!r}; valid: sgd, apex_lamb, apex_lars")


def _fmt(v):
    return "n/a" if v is None else f"{v:.2f}"


def train(cfg: Config) -> str:
    """Build an engine and fit it; returns "done" or "stopped"."""
    return Engine(cfg).fit()
