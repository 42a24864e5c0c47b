"""The training engine: one loop for every method (supervised, cRT, rotation, MoCo, self-training).

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

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .config import Config, ConfigError
from .data import build_loader
from .dataset import DatasetDir, DatasetError
from .evaluate import evaluate, write_report
from .methods import method_class
from .models import load_pretrained

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
            images += self.per_process_batch  # every image of the step (self-training: labeled + pseudo)
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
        counts = self.dataset.split(self.cfg.train_split).class_counts
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
                counts = self.dataset.split(self.cfg.train_split).class_counts
                write_report(self.run_dir, self.last_metrics | {"best_top1": self.state["best_top1"],
                                                                "best_epoch": self.state["best_epoch"]},
                             self.last_confusion, counts, self.dataset.class_names)
            (self.run_dir / "DONE").write_text(json.dumps(self.state))
        acc.wait_for_everyone()
        self.log(f"finished {self.run_dir}")


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
