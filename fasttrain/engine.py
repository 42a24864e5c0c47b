"""The training engine: one loop for every method (supervised, cRT, rotation, MoCo).

    engine = Engine(cfg)       # accelerator, data, method, model, optimiser, loaders
    status = engine.fit()      # "done" | "stopped" (after --stop-after-epochs) | "interrupted" (SIGTERM/SIGUSR1)

Runs under `python` (one process, CPU or one GPU) and `accelerate launch` (N GPUs / machines).
The run directory and its checkpoints (written so that a run killed at any moment resumes from its last
complete checkpoint) are fasttrain/checkpoints.py's; the engine saves, finds and restores through it.
Signals and a non-finite loss stop the loop after a step (fasttrain/stopping.py).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from . import tracking
from .checkpoints import Checkpoints, check_run_dir
from .config import Config
from .data import build_loader
from .dataset import DatasetDir, DatasetError
from .evaluate import evaluate, results_table, write_report
from .methods import method_class
from .models import head_for, load_pretrained
from .models.checkpoint import bare_model, save_backbone
from .runtime import configure_math, configure_threads, sync_batchnorm
from .stopping import Diverged, StopRequests

if TYPE_CHECKING:
    from .confusion import Confusion


class Engine:
    def __init__(self, cfg: Config):
        cfg.validate()
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        check_run_dir(self.run_dir, cfg)  # before anything is built or written
        self.trackers = tracking.tracker_names(cfg.log_with)
        self.accelerator = Accelerator(mixed_precision=cfg.precision,
                                       step_scheduler_with_optimizer=False, log_with=self.trackers or None,
                                       project_config=ProjectConfiguration(str(self.run_dir),
                                                                           str(tracking.tracker_dir(cfg))))
        acc = self.accelerator
        self.device = acc.device
        self.is_main = acc.is_main_process
        self.checkpoints = Checkpoints(self.run_dir, acc)
        self.stop = StopRequests(acc.num_processes, watch_loss=cfg.nonfinite_loss == "stop")
        if cfg.batch_size % acc.num_processes:
            raise ValueError(f"--batch-size {cfg.batch_size} (global) is not divisible by the "
                             f"{acc.num_processes} processes")
        self.per_process_batch = cfg.batch_size // acc.num_processes
        self.log(batch_and_lr(cfg, acc.num_processes))
        self.log(schedule_line(cfg))
        set_seed(cfg.seed)
        configure_math(cfg.deterministic, cfg.tf32)
        res = configure_threads(cfg.workers)
        self.log(f"resources per rank ({res['local_processes']} on this node): {res['cores_per_process']} core(s), "
                 f"{res['loader_workers']} loader workers / DALI threads, {res['torch_threads']} torch threads; "
                 f"cudnn.benchmark {not cfg.deterministic}, tf32 {cfg.tf32}")

        self.dataset = DatasetDir(cfg.data)
        self.method = method_class(cfg.method)(cfg, self.dataset)
        model = self.method.build_model()
        if cfg.pretrained:
            report = load_pretrained(model, cfg.pretrained)
            self.log(f"loaded {report.loaded} tensors from {cfg.pretrained}; head re-initialised; "
                     f"missing {report.missing or 'none'}; unexpected {report.unexpected or 'none'}")
        if cfg.sync_bn:
            model = sync_batchnorm(model, cfg.method, acc.num_processes, self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(cfg, self.method.trainable_parameters(model))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if cfg.compile:
            self.model = torch.compile(self.model)

        # Loaders shard themselves per rank: they are never passed to accelerator.prepare.
        self.train_loader = self.build_loader(cfg.train_split, views=self.method.views(train=True), train=True,
                                              sampler=cfg.sampler)
        if len(self.train_loader) == 0:
            raise DatasetError(f"{cfg.data}: split {cfg.train_split!r} gives no full batch of "
                               f"{self.per_process_batch} per process; lower --batch-size")
        # best epoch: selected on val where the data has one (test reported at that epoch), else on test
        self.eval_split = cfg.eval_split or ("val" if self.dataset.has_split("val") else self.dataset.eval_split())
        self.report_split = self.dataset.eval_split()
        self.eval_loader = (self.build_loader(self.eval_split, views=self.method.views(train=False), train=False)
                            if self.method.evaluates else None)
        self.method.setup(self)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum)
        self.state = {"epoch": 0, "step": 0, "best_top1": None, "best_epoch": None}
        self.partial_epoch: dict | None = None  # resumed inside an epoch: its first batch and running sums

    # ------------------------------------------------------------------------------------------
    def build_loader(self, split: str, *, views, train: bool, sampler: str = "uniform", batch_size: int | None = None,
                     sampling_labels=None, positions=None):
        acc = self.accelerator
        return build_loader(self.dataset, split, kind=self.cfg.loader, batch_size=batch_size or self.per_process_batch,
                            views=views, train=train, sampler=sampler, sampling_labels=sampling_labels,
                            positions=positions, seed=self.cfg.seed, rank=acc.process_index,
                            world_size=acc.num_processes, device=self.device, channels_last=self.cfg.channels_last,
                            workers=self.cfg.workers, samples_per_class=self.cfg.samples_per_class,
                            cb_beta=self.cfg.cb_beta)

    def track(self, values: dict, step: int) -> None:
        """Send scalars to the experiment trackers (--log-with; main process only), at global step `step`."""
        if self.trackers:
            self.accelerator.log(values, step=step)

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(f"[fasttrain] {message}")

    def lr_at(self, epoch: int, step: int = 0) -> float:
        return lr_at(self.cfg, epoch, step, len(self.train_loader))

    # ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the loaders' worker processes, threads and pipelines (the engine stays usable)."""
        for loader in (self.train_loader, self.eval_loader):
            if loader is not None:
                loader.close()

    def fit(self) -> str:
        """Train from the start or the resumed step to the end (or --stop-after-epochs, or a signal); the
        loaders are closed when it returns or fails."""
        try:
            with self.stop.catching_signals():
                return self._fit()
        finally:
            self.close()

    def _fit(self) -> str:
        cfg, acc = self.cfg, self.accelerator
        if (self.run_dir / "DONE").exists():
            self.log(f"{self.run_dir} is already complete (DONE); nothing to do")
            return "done"
        if cfg.resume:
            self.resume()  # reads only: a checkpoint that cannot be resumed is an error before anything is written
        first = self.state["epoch"]
        self.checkpoints.begin(cfg, first, self.state["step"])
        tracking.start(acc, cfg, self.trackers, self.state["step"])
        self.log(f"{cfg.method} | {cfg.arch} | {acc.num_processes} process(es) on {self.device} | "
                 f"{len(self.train_loader)} batches/epoch | epochs {first}..{cfg.epochs - 1} | loader {cfg.loader}")
        for epoch in range(first, cfg.epochs):
            logs = self.train_epoch(epoch, **(self.partial_epoch or {}))
            self.partial_epoch = None
            if logs is None:                    # a signal: checkpoint written at the step
                tracking.finish(acc)
                return "interrupted"
            last = epoch == cfg.epochs - 1
            if self.eval_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
                metrics = self.evaluate(epoch)
                logs.update({f"eval_{k}": metrics[k] for k in ("split", "top1", "top5", "many", "medium", "few")})
                best = self.state["best_top1"]
                if (best is None or metrics["top1"] > best) and math.isfinite(logs["loss"]):
                    self.state.update(best_top1=metrics["top1"], best_epoch=epoch)
                    self.state["epoch"] = epoch + 1
                    self.save_checkpoint("best")
            self.state["epoch"] = epoch + 1
            self.track(tracking.epoch_values(logs, epoch), self.state["step"])
            self.write_jsonl(logs | {"epoch": epoch})
            self.save_checkpoint("last")
            if self.stop.settle() == "signal":  # it came during the evaluation or the save
                self.log_interrupted(epoch + 1, 0)
                tracking.finish(acc)
                return "interrupted"
            if cfg.stop_after_epochs and epoch + 1 - first >= cfg.stop_after_epochs and not last:
                self.log(f"stopped after {cfg.stop_after_epochs} epoch(s) at epoch {epoch + 1}/{cfg.epochs}; "
                         f"continue with --resume {self.run_dir}")
                tracking.finish(acc)
                return "stopped"
        self.finish()
        return "done"

    def train_epoch(self, epoch: int, first_batch: int = 0, sums: dict | None = None) -> dict | None:
        """One epoch (from `first_batch` on, with the running `sums` of the batches before, when resumed inside
        it). Returns the epoch's means; None when a signal stopped the run (checkpoint written at the step)."""
        cfg, acc, model = self.cfg, self.accelerator, self.model
        self.train_loader.set_epoch(epoch, first_batch)
        self.method.train_mode(model)
        n = len(self.train_loader)
        sums: dict[str, torch.Tensor] = dict(sums or {})
        images, t0, stop = 0, time.perf_counter(), None
        bar = tqdm(total=n, initial=first_batch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not self.is_main,
                   leave=False, dynamic_ncols=True)
        for i, batch in enumerate(self.train_loader, start=first_batch):
            lr = self.lr_at(epoch, i)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            group = accumulation_group(i, n, cfg.grad_accum)    # micro-batches in this optimiser step
            sync = (i + 1) % cfg.grad_accum == 0 or i + 1 == n   # its last one: all-reduce and step
            with contextlib.nullcontext() if sync else acc.no_sync(model):
                loss, logs = self.method.loss(model, batch, epoch)
                acc.backward(loss / group if group > 1 else loss)
            if sync:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.method.after_step(model)
                self.state["step"] += 1
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            images += self.per_process_batch
            if (i + 1) % cfg.log_every == 0 or i + 1 == n:
                loss_so_far = (sums['loss'] / (i + 1)).item()
                self.stop.saw_loss(loss_so_far)
                bar.set_postfix(loss=f"{loss_so_far:.4f}", lr=f"{lr:.4g}")
                self.track({"train/loss": loss_so_far, "train/lr": lr}, self.state["step"])
            bar.update(1)
            if sync and (reason := self.stop.poll()):
                stop = (i + 1, reason)
                break
        else:
            if reason := self.stop.settle():    # the flags of the epoch's last step, on every rank
                stop = (n, reason)
        bar.close()
        if stop:
            self.stop_inside_epoch(epoch, *stop, sums)
            return None
        self.sync_buffers()
        seconds = time.perf_counter() - t0
        totals = torch.stack(list(sums.values())) / n                 # one read-back per epoch
        means = dict(zip(sums, (acc.reduce(totals, "mean") if acc.num_processes > 1 else totals).tolist()))
        means.update(lr=self.lr_at(epoch, n - 1), seconds=seconds,
                     train_images_per_s=images * acc.num_processes / seconds)
        self.log(f"epoch {epoch + 1}/{cfg.epochs} " + " ".join(f"{k} {v:.4g}" for k, v in means.items()))
        return means

    def stop_inside_epoch(self, epoch: int, batch: int, reason: str, sums: dict) -> None:
        """A non-finite loss: Diverged, nothing saved. A signal: checkpoints/last at this step, one line."""
        if reason == "nonfinite":
            raise Diverged(f"the training loss is not finite at epoch {epoch} (step {self.state['step']}, batch "
                           f"{batch} of {len(self.train_loader)}, lr {self.lr_at(epoch, batch - 1):.6g}); stopped: "
                           f"{self.checkpoints.describe_last()}. Lower --lr (a new --out), or --nonfinite-loss "
                           f"continue to train on")
        self.save_checkpoint("last", batch=batch, sums=sums)
        self.log_interrupted(epoch, batch)

    def log_interrupted(self, epoch: int, batch: int) -> None:
        inside = f", batch {batch} of {len(self.train_loader)}" if batch else ""
        self.log(f"{self.stop.signal_name()}: stopped at epoch {epoch} (step {self.state['step']}){inside}; "
                 f"checkpoints/last holds this step; continue with --resume {self.run_dir} (a chain: the same "
                 f"command)")

    def sync_buffers(self) -> None:
        """Average the BatchNorm running statistics over ranks. DDP only broadcasts rank 0's
        buffers at the start of a forward, so after an epoch every rank holds its own statistics; without
        this, each rank would evaluate its part of the test set with a slightly different model."""
        if self.accelerator.num_processes == 1:
            return
        for _, buffer in self.batchnorm_statistics():
            torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
            buffer /= self.accelerator.num_processes

    def batchnorm_statistics(self):
        """(name, tensor) of every BatchNorm running mean and variance: each rank's own inside an epoch."""
        for name, module in self.accelerator.unwrap_model(self.model).named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                yield f"{name}.running_mean", module.running_mean
                yield f"{name}.running_var", module.running_var

    def evaluate(self, epoch: int, split: str | None = None) -> dict:
        """Classification metrics of the current model on `split` (default: the selection split)."""
        split = split or self.eval_split
        loader = self.eval_loader if split == self.eval_split else self.build_loader(
            split, views=self.method.views(train=False), train=False)
        counts = self.dataset.shot_counts(self.cfg.train_split)  # labeled counts (self-training)
        try:
            metrics, confusion = evaluate(self.accelerator.unwrap_model(self.model), loader,
                                          self.dataset.num_classes, counts, self.accelerator,
                                          many=self.cfg.many_threshold, few=self.cfg.few_threshold)
        finally:
            if loader is not self.eval_loader:
                loader.close()
        metrics.update(epoch=epoch, split=split)
        self.log(f"eval {split} (epoch {epoch + 1}): top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} "
                 f"many {_fmt(metrics['many'])} medium {_fmt(metrics['medium'])} few {_fmt(metrics['few'])}")
        self.last_metrics, self.last_confusion = metrics, confusion
        return metrics

    def final_and_best(self) -> tuple[dict, "Confusion", dict | None]:
        """The report split (test, else val) for the final model and for the best epoch's checkpoint (the
        epoch with the highest top-1 on the selection split). Leaves the final model in place."""
        last = self.cfg.epochs - 1
        done = getattr(self, "last_metrics", None)
        if not (done and done["split"] == self.report_split and done["epoch"] == last):
            self.evaluate(last, self.report_split)
        final, confusion = self.last_metrics, self.last_confusion
        best_epoch = self.state["best_epoch"]
        if best_epoch is None:
            return final, confusion, None
        if best_epoch == last:
            best = dict(final)
            self.save_best_backbone()
        else:
            self.checkpoints.load("best")
            best = self.evaluate(best_epoch, self.report_split)
            self.save_best_backbone()
            self.checkpoints.load("last")
        return final, confusion, best | {"selected_on": self.eval_split, "selection_top1": self.state["best_top1"]}

    # ------------------------------------------------------------------------------------------
    def write_jsonl(self, record: dict) -> None:
        """One line per epoch, appended before that epoch's checkpoint; `trim_metrics` drops it again when a
        run resumes from an earlier checkpoint, so no epoch is ever listed twice."""
        self.checkpoints.append_metrics(record, self.state["epoch"])

    def save_checkpoint(self, name: str, batch: int = 0, sums: dict | None = None) -> None:
        """checkpoints/NAME with the engine's state (see fasttrain/checkpoints.py for how it is written). Inside
        an epoch (`batch` > 0) also the batch and, per rank, the running `sums` and BatchNorm statistics."""
        if not batch:
            return self.checkpoints.save(name, self.state)
        several = self.accelerator.num_processes > 1
        statistics = {k: v.clone() for k, v in self.batchnorm_statistics()} if several else {}
        self.checkpoints.save(name, self.state | {"batch": batch, "processes": self.accelerator.num_processes},
                              rank_progress={"sums": sums, "batchnorm": statistics})

    def resume(self) -> None:
        """Continue from the newest complete checkpoint; a corrupt one is a CheckpointError naming the file and
        the other checkpoints there are (fasttrain/checkpoints.py)."""
        restored = self.checkpoints.restore(self.accelerator.unwrap_model(self.model), self.cfg.data)
        if restored is None:
            self.log(f"--resume {self.run_dir}: no complete checkpoint yet; starting at epoch 0")
            return
        ckpt, state, progress = restored
        batch = state.pop("batch", 0)
        state.pop("processes", None)
        self.state.update(state)
        if batch:
            for name, buffer in self.batchnorm_statistics():
                if name in progress["batchnorm"]:
                    buffer.copy_(progress["batchnorm"][name])
            self.partial_epoch = {"first_batch": batch,
                                  "sums": {k: v.to(self.device) for k, v in progress["sums"].items()}}
        self.log(f"resumed {self.run_dir} at epoch {self.state['epoch']} (step {self.state['step']})"
                 + (f", batch {batch} of {len(self.train_loader)}" if batch else "")
                 + (f" from {ckpt.name} (a save was interrupted)" if ckpt.name != "last" else ""))

    def save_best_backbone(self) -> None:
        """backbone_best.pt: the best epoch's backbone. The paper's ImageNet-LT / iNat code hands its best-val
        weights to the next stage, so the cRT stages of those chains start from this file."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            save_backbone(self.accelerator.unwrap_model(self.model), self.run_dir / "backbone_best.pt")

    def finish(self) -> None:
        acc = self.accelerator
        final = confusion = best = None
        if self.eval_loader is not None:
            final, confusion, best = self.final_and_best()
        acc.wait_for_everyone()
        if self.is_main:
            model = bare_model(self.model)            # no DDP / torch.compile prefixes in the saved files
            self.method.export(model, self.run_dir)
            torch.save({"arch": self.cfg.arch, "width": self.cfg.width, "head": head_for(self.cfg.head, self.cfg.loss),
                        "num_classes": self.method.num_outputs(), "in_channels": self.dataset.channels,
                        "method": self.cfg.method, "state_dict": model.state_dict()}, self.run_dir / "model.pt")
            if final is not None:
                counts = self.dataset.shot_counts(self.cfg.train_split)  # labeled counts (self-training)
                report = write_report(self.run_dir, final, confusion, counts, self.dataset.class_names, best=best,
                                      epochs=self.cfg.epochs)
                tqdm.write(results_table(report))
            (self.run_dir / "DONE").write_text(json.dumps(self.state))
        tracking.finish(acc)
        acc.wait_for_everyone()
        self.log(f"finished {self.run_dir}")


def accumulation_group(batch: int, batches: int, accum: int) -> int:
    """How many micro-batches the optimiser step that batch `batch` (0-based, of `batches` in the epoch) belongs
    to makes up: `accum`, or fewer for the epoch's last step when `accum` does not divide the epoch. Gradients
    never cross an epoch: each step's loss is the mean over its own micro-batches, as one batch of that size."""
    start = batch - batch % accum
    return min(accum, batches - start)


def batch_and_lr(cfg: Config, processes: int) -> str:
    """The one line, printed at start, saying how the batch is split and where the lr comes from."""
    accum = f" x {cfg.grad_accum} accumulation steps" if cfg.grad_accum > 1 else ""
    line = (f"batch {cfg.optimizer_batch()} per optimiser step = {processes} process(es) x "
            f"{cfg.batch_size // processes} per process{accum}; ")
    if cfg.lr_ref_batch > 0:
        return line + (f"lr {cfg.effective_lr():.6g} = {cfg.lr:g} x {cfg.optimizer_batch()} / {cfg.lr_ref_batch} "
                       f"(reference: lr {cfg.lr:g} at batch {cfg.lr_ref_batch}, scaled linearly)")
    return line + f"lr {cfg.lr:g} (not scaled with the batch: --lr-ref-batch 0)"


def lr_at(cfg: Config, epoch: int, step: int = 0, steps: int = 1) -> float:
    """Learning rate of step `step` (of `steps`) of 0-based `epoch` (see Config.schedule_epochs for positions).

    Each update covers the interval (start, end] of the run, in epochs: the whole epoch (--lr-update epoch_end
    or epoch_start: lr constant over the epoch) or one step (--lr-update step). A step milestone M applies from
    the first interval with start >= M on (paper: 1-based e > 160). Warm-up W: lr * end / W while end < W (paper:
    e <= 5: lr * e / 5). Cosine: lr * (1 + cos(pi * (x - W) / (T - W))) / 2 at x = end (epoch_end, step; the
    ImageNet-LT / iNat code: lr at e/T, 0 in the last epoch) or x = start (epoch_start; MoCo v2's code).
    """
    base, points = cfg.effective_lr(), cfg.schedule_epochs()
    if cfg.lr_update == "step":
        start, end = epoch + step / steps, epoch + (step + 1) / steps
    else:
        start, end = epoch, epoch + 1
    warmup = points["warmup"]
    if end < warmup:
        return base * end / warmup
    if cfg.schedule == "cosine":
        x = start if cfg.lr_update == "epoch_start" else end
        t = (x - warmup) / max(1e-8, cfg.epochs - warmup)
        return base * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, t))))
    if cfg.schedule == "step":
        factor = 1.0
        for milestone, f in zip(points["milestones"], cfg.milestone_factors):
            if start >= milestone:
                factor = f
        return base * factor
    if cfg.schedule == "constant":
        return base
    raise ValueError(f"unknown --schedule {cfg.schedule!r}; valid: step, cosine, constant")


def schedule_line(cfg: Config) -> str:
    """The one line, printed at start, saying what the schedule does in this run: the lr of every epoch (1-based)
    as ranges, a constant range with its value, a changing one (warm-up, cosine) with its first and last value;
    DRW's first epoch when --reweight drw; and a warning when no epoch trains within 10% of the base lr (a run
    too short for the schedule's positions, e.g. a 1-epoch cosine run trains at lr 0)."""
    base = cfg.effective_lr()
    lrs = [lr_at(cfg, e) for e in range(cfg.epochs)]
    warmup = cfg.schedule_epochs()["warmup"]

    def same(a: float, b: float) -> bool:
        return math.isclose(a, b, rel_tol=1e-12)

    parts, i = [], 0
    while i < len(lrs):
        j = i
        if i + 1 < len(lrs) and same(lrs[i + 1], lrs[i]):               # a constant range
            while j + 1 < len(lrs) and same(lrs[j + 1], lrs[i]):
                j += 1
            value = f"{lrs[i]:.4g}"
        else:                                                           # a changing range, up to the next constant one
            while j + 1 < len(lrs) and not same(lrs[j + 1], lrs[j]) and not (
                    j + 2 < len(lrs) and same(lrs[j + 2], lrs[j + 1])):
                j += 1
            kind = " + ".join(k for k, on in (("warm-up", i + 1 < warmup), (cfg.schedule, j + 1 >= warmup)) if on)
            value = f"{lrs[i]:.4g}" if i == j else f"{lrs[i]:.4g} -> {lrs[j]:.4g} ({kind})"
        parts.append(f"{i + 1}{'' if i == j else f'-{j + 1}'}: {value}")
        i = j + 1
    step = "; --lr-update step: it also changes within epochs" if cfg.lr_update == "step" else ""
    line = f"lr by epoch (base {base:.6g}{step}): " + ", ".join(parts)
    if cfg.reweight == "drw":
        drw = cfg.schedule_epochs()["drw"]
        line += f"; DRW from epoch {drw + 1}" if drw < cfg.epochs else f"; DRW never (it starts at epoch {drw + 1})"
    top = max(range(len(lrs)), key=lrs.__getitem__)
    if lrs[top] < 0.9 * base:
        line += (f" -- WARNING: no epoch trains within 10% of the base lr {base:.6g} (highest: {lrs[top]:.4g} in "
                 f"epoch {top + 1}): the schedule's warm-up and decay leave no epoch at the base lr in this "
                 f"{cfg.epochs}-epoch run; give more --epochs, other positions (--warmup-epochs, --milestone-epochs) "
                 f"or --schedule constant")
    return line


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
