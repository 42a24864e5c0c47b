"""The training engine: one loop for every method (supervised, cRT, rotation, MoCo).

    engine = Engine(cfg)       # accelerator, data, method, model, optimiser, loaders
    status = engine.fit()      # "done" | "stopped" (after --stop-after-epochs)

Runs under `python` (one process, CPU or one GPU) and `accelerate launch` (N GPUs / machines).
Checkpoints are `accelerator.save_state` directories written under a temporary name and renamed, so a
run killed at any moment resumes from its last complete epoch (see `save_checkpoint`, `find_checkpoint`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from . import tracking
from .config import Config, ConfigError
from .data import build_loader
from .dataset import DatasetDir, DatasetError
from .evaluate import evaluate, results_table, write_report
from .methods import method_class
from .models import head_for, load_pretrained
from .models.checkpoint import bare_model, save_backbone
from .runtime import configure_math, configure_threads, sync_batchnorm

CHECKPOINT_FORMAT = 1
STATE_FILE = "trainer_state.json"  # written last: a checkpoint directory holding it is complete


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from (corrupt, truncated, made for another model); names the file."""


class RunDirError(RuntimeError):
    """The run directory cannot be written (read-only, disk full); says what survived and how to continue."""


class Engine:
    def __init__(self, cfg: Config):
        cfg.validate()
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        check_run_dir(self.run_dir, cfg)  # before anything is built or written
        self.trackers = tracking.tracker_names(cfg.log_with)
        self.accelerator = Accelerator(mixed_precision=cfg.precision, gradient_accumulation_steps=cfg.grad_accum,
                                       step_scheduler_with_optimizer=False, log_with=self.trackers or None,
                                       project_config=ProjectConfiguration(str(self.run_dir),
                                                                           str(tracking.tracker_dir(cfg))))
        acc = self.accelerator
        self.device = acc.device
        self.is_main = acc.is_main_process
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
        """Train from the start or the resumed epoch to the end (or --stop-after-epochs); the loaders are
        closed when it returns or fails."""
        try:
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
        error = None
        if self.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                cfg.save(self.run_dir / "config.yaml")
                trim_metrics(self.run_dir / "metrics.jsonl", first, self.state["step"])
            except OSError as e:
                error = self.io_error(e, self.run_dir)
        error = self.first_error(error)
        if error:
            raise RunDirError(error)
        tracking.start(acc, cfg, self.trackers, self.state["step"])
        self.log(f"{cfg.method} | {cfg.arch} | {acc.num_processes} process(es) on {self.device} | "
                 f"{len(self.train_loader)} batches/epoch | epochs {first}..{cfg.epochs - 1} | loader {cfg.loader}")
        for epoch in range(first, cfg.epochs):
            logs = self.train_epoch(epoch)
            last = epoch == cfg.epochs - 1
            if self.eval_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
                metrics = self.evaluate(epoch)
                logs.update({f"eval_{k}": metrics[k] for k in ("split", "top1", "top5", "many", "medium", "few")})
                best = self.state["best_top1"]
                if best is None or metrics["top1"] > best:
                    self.state.update(best_top1=metrics["top1"], best_epoch=epoch)
                    self.state["epoch"] = epoch + 1
                    self.save_checkpoint("best")
            self.state["epoch"] = epoch + 1
            self.track(tracking.epoch_values(logs, epoch), self.state["step"])
            self.write_jsonl(logs | {"epoch": epoch})
            self.save_checkpoint("last")
            if cfg.stop_after_epochs and epoch + 1 - first >= cfg.stop_after_epochs and not last:
                self.log(f"stopped after {cfg.stop_after_epochs} epoch(s) at epoch {epoch + 1}/{cfg.epochs}; "
                         f"continue with --resume {self.run_dir}")
                tracking.finish(acc)
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
            lr = self.lr_at(epoch, i)
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
                loss_so_far = (sums['loss'] / (i + 1)).item()
                bar.set_postfix(loss=f"{loss_so_far:.4f}", lr=f"{lr:.4g}")
                self.track({"train/loss": loss_so_far, "train/lr": lr}, self.state["step"])
            bar.update(1)
        bar.close()
        self.sync_buffers()
        seconds = time.perf_counter() - t0
        totals = torch.stack(list(sums.values())) / n                 # one read-back per epoch
        means = dict(zip(sums, (acc.reduce(totals, "mean") if acc.num_processes > 1 else totals).tolist()))
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
            checkpoints = self.run_dir / "checkpoints"
            self.accelerator.load_state(str(checkpoints / "best"))
            best = self.evaluate(best_epoch, self.report_split)
            self.save_best_backbone()
            self.accelerator.load_state(str(checkpoints / "last"))
        return final, confusion, best | {"selected_on": self.eval_split, "selection_top1": self.state["best_top1"]}

    # ------------------------------------------------------------------------------------------
    def write_jsonl(self, record: dict) -> None:
        """One line per epoch, appended before that epoch's checkpoint; `trim_metrics` drops it again when a
        run resumes from an earlier checkpoint, so no epoch is ever listed twice."""
        if self.is_main:
            try:
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise RunDirError(self.io_error(e, self.run_dir / "metrics.jsonl")) from None

    def save_checkpoint(self, name: str) -> None:
        """Write checkpoints/NAME so that a kill at any instant leaves a complete checkpoint to resume from:
        1. every rank: `save_state` into `.NAME.tmp` (removed first if a kill left one);
        2. main: fsync, then `trainer_state.json` (temp name + rename), which marks the directory complete;
        3. main: NAME -> `.NAME.old`, `.NAME.tmp` -> NAME, remove `.NAME.old` (its trainer_state.json first).
        Between the renames only `.NAME.old` and `.NAME.tmp` exist; `find_checkpoint` takes the newest complete
        one. A failed write (full disk) raises RunDirError on every rank and leaves NAME as it was."""
        acc = self.accelerator
        ckdir = self.run_dir / "checkpoints"
        final, tmp = ckdir / name, ckdir / f".{name}.tmp"
        error = None
        try:
            if self.is_main:
                remove_checkpoint(tmp)
            acc.wait_for_everyone()
            acc.save_state(str(tmp))
        except Exception as e:  # torch.save reports a full disk as RuntimeError, safetensors as SafetensorError
            error = _one_line(e)
        error = self.first_error(error)  # every rank has written its part (or some rank failed)
        if error is None and self.is_main:
            try:
                fsync_tree(tmp)
                write_atomic(tmp / STATE_FILE, json.dumps(self.state | {"format": CHECKPOINT_FORMAT}))
                promote_checkpoint(tmp, final)
            except Exception as e:
                error = _one_line(e)
        error = self.first_error(error)
        acc.wait_for_everyone()
        if error is not None:
            if self.is_main:
                try:
                    remove_checkpoint(tmp)  # the half-written one; NAME is untouched
                except OSError:
                    pass
            kept = (f"checkpoints/{name} still holds the previous complete checkpoint"
                    if (final / STATE_FILE).exists() else f"no complete checkpoints/{name} was written yet")
            raise RunDirError(f"could not write checkpoint {tmp} after epoch {self.state['epoch']}: {error}"
                              f"{_free_space(ckdir)}; {kept}. Fix this, then continue with --resume {self.run_dir}")

    def first_error(self, error: str | None) -> str | None:
        """The first rank's error message, on every rank (a collective: no rank is left waiting at a barrier)."""
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object
            error = next((e for e in gather_object([error]) if e), None)
        return error

    def io_error(self, e: OSError, path: Path) -> str:
        where = e.filename or path
        done = self.state["epoch"]
        tail = (f"{self.run_dir} keeps its last complete checkpoint (after {done} epoch(s)): fix this, then continue "
                f"with --resume {self.run_dir}" if (self.run_dir / "checkpoints").exists()
                else "choose another --out or fix its permissions / free space")
        return f"cannot write {where}: {e.strerror or e}; {tail}"

    def resume(self) -> None:
        """Continue from the newest complete checkpoint (`find_checkpoint`); a corrupt one is a CheckpointError
        naming the file and the other checkpoints there are. After every rank has loaded, the main process
        makes the one it resumed from `checkpoints/last` and removes leftovers of an interrupted save."""
        acc, ckdir = self.accelerator, self.run_dir / "checkpoints"
        ckpt, state = find_checkpoint(ckdir, "last")
        if ckpt is None:
            self.log(f"--resume {self.run_dir}: no complete checkpoint yet; starting at epoch 0")
            return
        try:
            check_checkpoint_shapes(ckpt, acc.unwrap_model(self.model), self.cfg.data)
            acc.load_state(str(ckpt))
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot resume {self.run_dir} from {ckpt}: {damaged_file(ckpt) or _one_line(e)}. "
                                  + alternatives(self.run_dir, ckpt)) from e
        self.state.update({k: v for k, v in state.items() if k != "format"})
        acc.wait_for_everyone()
        if self.is_main:
            try:
                promote_checkpoint(ckpt, ckdir / "last")
                tidy_checkpoints(ckdir)
            except OSError as e:
                raise RunDirError(self.io_error(e, ckdir)) from None
        acc.wait_for_everyone()
        self.log(f"resumed {self.run_dir} at epoch {self.state['epoch']} (step {self.state['step']})"
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


def check_run_dir(run_dir: Path, cfg: Config) -> None:
    """Refuse, before anything is written, a launch that would change an existing run: `--out` on a folder
    that holds a run, or `--resume` with other settings than the run's config.yaml."""
    started = (run_dir / "checkpoints").exists() or (run_dir / "DONE").exists()
    if started and not cfg.resume:
        raise FileExistsError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                              f"or choose a new --out")
    saved = run_dir / "config.yaml"
    if cfg.resume and saved.is_file():
        changed = cfg.changed_from(Config.load(saved))
        if changed:
            raise ConfigError(f"--resume {run_dir}: cannot change {changed} of a saved run (see {saved}); "
                              f"start a new run directory instead")


def read_state(ckpt: Path) -> dict | None:
    """The checkpoint's trainer_state.json, or None when the directory is incomplete (no such file)."""
    path = ckpt / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({_one_line(e)}). "
                              + alternatives(ckpt.parent.parent, ckpt)) from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise CheckpointError(f"{path} is not a fasttrain trainer state. " + alternatives(ckpt.parent.parent, ckpt))
    return state


def find_checkpoint(ckdir: Path, name: str) -> tuple[Path | None, dict]:
    """The newest complete checkpoint of NAME: NAME itself, or - after a kill inside save_checkpoint -
    `.NAME.tmp` (saved, not yet renamed) or `.NAME.old` (the previous one, moved aside). Ties go to NAME."""
    best, best_state = None, {}
    for ckpt in (ckdir / name, ckdir / f".{name}.tmp", ckdir / f".{name}.old"):
        state = read_state(ckpt) if ckpt.is_dir() else None
        if state is not None and (best is None or (state["epoch"], state.get("step", 0))
                                  > (best_state["epoch"], best_state.get("step", 0))):
            best, best_state = ckpt, state
    return best, best_state


def remove_checkpoint(ckpt: Path) -> None:
    """trainer_state.json first, so a kill during the removal never leaves a directory that looks complete."""
    if not ckpt.exists():
        return
    (ckpt / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(ckpt)


def promote_checkpoint(src: Path, final: Path) -> None:
    """Make the complete checkpoint `src` the one named `final`, with atomic renames only (main process)."""
    if src == final:
        return
    old = final.with_name(f".{final.name}.old")
    if src == old:  # final is missing: a kill came between the two renames and no newer save completed
        remove_checkpoint(final)
        old.rename(final)
        return
    if final.exists():
        remove_checkpoint(old)
        final.rename(old)
    src.rename(final)
    remove_checkpoint(old)


def tidy_checkpoints(ckdir: Path) -> None:
    """After resuming: each checkpoint family (last, best) back to one complete directory under its name."""
    for name in ("last", "best"):
        ckpt, _ = find_checkpoint(ckdir, name)
        if ckpt is not None:
            promote_checkpoint(ckpt, ckdir / name)
        for leftover in (ckdir / f".{name}.tmp", ckdir / f".{name}.old"):
            remove_checkpoint(leftover)


def damaged_file(ckpt: Path) -> str | None:
    """Which file of a checkpoint is empty, truncated or unreadable (only called after loading failed)."""
    for path in sorted(p for p in ckpt.iterdir() if p.is_file() and p.name != STATE_FILE):
        if path.stat().st_size == 0:
            return f"{path} is empty"
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                load_file(str(path))
            elif path.suffix in (".bin", ".pt", ".pth", ".pkl"):
                torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            return f"{path} is truncated or corrupt ({_one_line(e)})"
    return None


def alternatives(run_dir: Path, broken: Path) -> str:
    """What the user can do instead: the other complete checkpoints of the run, or starting over."""
    others = []
    for ckpt in sorted((run_dir / "checkpoints").glob("*")) if (run_dir / "checkpoints").is_dir() else []:
        if ckpt != broken and ckpt.is_dir():
            try:
                state = read_state(ckpt)
            except CheckpointError:
                state = None
            if state is not None:
                others.append(f"{ckpt} (after {state['epoch']} epoch(s)): `rm -r {broken} && cp -r {ckpt} "
                              f"{broken}`, then --resume {run_dir} again")
    keep = f"To continue from {'; or from '.join(others)}; or" if others else "No other complete checkpoint is there;"
    return f"{keep} start over with a new --out (or delete {run_dir})"


def trim_metrics(path: Path, epoch: int, step: int) -> None:
    """Keep only metrics.jsonl lines from before `epoch` (after a resume from an earlier checkpoint, or a
    fresh start); also drops a line cut short by a kill. Rewritten via temp name + rename."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("epoch", -1) < epoch and ("epoch" in record or record.get("step", 0) <= step):
            keep.append(line)
    if keep != lines:
        write_atomic(path, "".join(f"{line}\n" for line in keep))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_tree(root: Path) -> None:
    """Flush a freshly written checkpoint to disk before it is marked complete."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _free_space(path: Path) -> str:
    try:
        probe = next(p for p in (path, *path.parents) if p.exists())
        return f" ({shutil.disk_usage(probe).free / 2 ** 20:.1f} MiB free on {probe})"
    except (OSError, StopIteration):
        return ""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def check_checkpoint_shapes(ckpt: Path, model: torch.nn.Module, data: str) -> None:
    """A clear error (not a wall of size-mismatch text) when a checkpoint does not fit this model/data."""
    files = sorted(ckpt.glob("model*.safetensors")) or sorted(ckpt.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{ckpt}: no model weights in the checkpoint. " + alternatives(ckpt.parent.parent, ckpt))
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
        raise CheckpointError(f"cannot resume from {ckpt}: {key} has shape {got}, this model needs {want} "
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
