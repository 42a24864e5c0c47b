"""The run directory and its checkpoints: what a complete checkpoint is, how it is written, found, promoted,
tidied and resumed from, and how metrics.jsonl is kept consistent with it. The engine calls `Checkpoints`
(every method a collective: called on every rank); the functions below it are the protocol's steps.

    RUN/config.yaml            the resolved config; written (temp name + rename) when a run starts or resumes
    RUN/metrics.jsonl          one line per epoch, appended just before that epoch's checkpoint
    RUN/checkpoints/last/      the newest complete checkpoint
    RUN/checkpoints/best/      the best epoch's checkpoint (highest top-1 on the selection split)
    RUN/DONE                   written last by the engine, after model.pt and metrics.json

A checkpoint is a directory: the `accelerator.save_state` files of every rank (model, optimiser, RNG states,
gradient scaler) and `trainer_state.json` (the engine's state: epoch, step, best top-1 and epoch).
`trainer_state.json` is written last: a directory that holds it is complete, one without it is never
resumed from, and removing a checkpoint deletes it first.

Checkpoints are written at the end of an epoch (`epoch` = epochs done) and, when a signal stops the run,
inside one (fasttrain/stopping.py): then `epoch` is the epoch in progress, trainer_state.json also holds
`batch` (its batches done) and `processes`, and every rank writes `progress_rank{R}.pt` (fsynced) next to its
save_state files: the epoch's running metric sums and, with several processes, its BatchNorm statistics, so
the resumed epoch ends exactly as an uninterrupted one. Such a checkpoint resumes only with the same number
of processes (each rank's share of the epoch depends on it).

Saving checkpoints/NAME (`Checkpoints.save`), step by step, and what a kill after each step leaves:
  1. main: a `.NAME.tmp` left by an earlier kill is removed.        NAME (+ perhaps an incomplete .tmp)
  2. every rank: `save_state` into `.NAME.tmp`.                     NAME, an incomplete .NAME.tmp
  3. main: fsync every file of it, then `trainer_state.json`
     (temp name + rename): the new checkpoint is complete.          NAME (older), .NAME.tmp (newer)
  4. main: rename NAME -> `.NAME.old`.                              .NAME.old (older), .NAME.tmp (newer)
  5. main: rename `.NAME.tmp` -> NAME.                              NAME (newer), .NAME.old (older)
  6. main: remove `.NAME.old`, trainer_state.json first.            NAME (+ perhaps an incomplete .old)
At every instant at least one complete checkpoint of NAME exists (once one was ever written), and
`find_checkpoint` takes the newest complete one of NAME, .NAME.tmp and .NAME.old by (epoch, step), ties to
NAME. A write that fails (full disk) raises RunDirError on every rank, removes the half-written .NAME.tmp and
leaves NAME as it was.

Resuming (`Checkpoints.restore`): every rank loads the newest complete `last` (its shapes are checked first;
a file that cannot be read is a CheckpointError naming it and the other complete checkpoints); then the main
process makes it `checkpoints/last` with renames only (`promote_checkpoint`) and removes what an interrupted
save left (`tidy_checkpoints`), for `best` too. Nothing is written before every check has passed.

metrics.jsonl: when a run (re)starts (`Checkpoints.begin`), `trim_metrics` keeps only the lines of the epochs
the resumed checkpoint contains (dropping those an interrupted attempt logged after it, and a line cut short
by a kill), rewriting the file (temp name + rename) only when a line goes; so each epoch appears exactly once.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import Config, ConfigError
from .files import atomic_file

if TYPE_CHECKING:
    from accelerate import Accelerator

CHECKPOINT_FORMAT = 1
STATE_FILE = "trainer_state.json"  # written last: a checkpoint directory holding it is complete


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from (corrupt, truncated, made for another model); names the file."""


class RunDirError(RuntimeError):
    """The run directory cannot be written (read-only, disk full); says what survived and how to continue."""


class Checkpoints:
    """The engine's side of the protocol for one run directory under one Accelerator."""

    def __init__(self, run_dir: Path, accelerator: "Accelerator"):
        self.run_dir, self.accelerator = Path(run_dir), accelerator
        self.dir = self.run_dir / "checkpoints"
        self.is_main = accelerator.is_main_process

    def begin(self, cfg: Config, epoch: int, step: int) -> None:
        """A run starts or resumes at `epoch` / `step`: the run directory, config.yaml, metrics.jsonl trimmed."""
        error = None
        if self.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                cfg.save(self.run_dir / "config.yaml")
                trim_metrics(self.run_dir / "metrics.jsonl", epoch, step)
            except OSError as e:
                error = self.io_error(e, self.run_dir, epoch)
        error = self.first_error(error)
        if error:
            raise RunDirError(error)

    def append_metrics(self, record: dict, epochs_done: int) -> None:
        """One line of metrics.jsonl (main process), appended before that epoch's checkpoint is saved."""
        if self.is_main:
            try:
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise RunDirError(self.io_error(e, self.run_dir / "metrics.jsonl", epochs_done)) from None

    def save(self, name: str, state: dict, rank_progress: dict | None = None) -> None:
        """Write checkpoints/NAME holding `state` (steps 1-6 of the module docstring); inside an epoch, every
        rank's `rank_progress` too (written in step 2)."""
        acc = self.accelerator
        final, tmp = self.dir / name, self.dir / f".{name}.tmp"
        error = None
        try:
            if self.is_main:
                remove_checkpoint(tmp)
            acc.wait_for_everyone()
            acc.save_state(str(tmp))
            if rank_progress is not None:
                with open(tmp / progress_file(acc.process_index), "wb") as f:
                    torch.save(rank_progress, f)
                    f.flush()
                    os.fsync(f.fileno())
        except Exception as e:  # torch.save reports a full disk as RuntimeError, safetensors as SafetensorError
            error = one_line(e)
        error = self.first_error(error)  # every rank has written its part (or some rank failed)
        if error is None and self.is_main:
            try:
                fsync_tree(tmp)
                with atomic_file(tmp / STATE_FILE, fsync=True) as f:
                    f.write(json.dumps(state | {"format": CHECKPOINT_FORMAT}))
                promote_checkpoint(tmp, final)
            except Exception as e:
                error = one_line(e)
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
            raise RunDirError(f"could not write checkpoint {tmp} after epoch {state['epoch']}: {error}"
                              f"{free_space(self.dir)}; {kept}. Fix this, then continue with --resume {self.run_dir}")

    def restore(self, model: torch.nn.Module, data: str) -> tuple[Path, dict, dict | None] | None:
        """Load the newest complete `last` checkpoint into the accelerator's objects; returns the directory it
        came from (before it was promoted to `last`), its state and, for one written inside an epoch, this
        rank's progress; None when there is no complete checkpoint yet."""
        acc = self.accelerator
        ckpt, state = find_checkpoint(self.dir, "last")
        if ckpt is None:
            return None
        processes = state.get("processes", acc.num_processes)
        if processes != acc.num_processes:
            raise CheckpointError(f"{ckpt} was written inside epoch {state['epoch']} (after batch {state['batch']}) "
                                  f"by {processes} process(es); each process's share of the epoch depends on their "
                                  f"number: resume with {processes} (this launch has {acc.num_processes})")
        progress = None
        try:
            check_checkpoint_shapes(ckpt, model, data)
            acc.load_state(str(ckpt))
            if "batch" in state:
                progress = torch.load(ckpt / progress_file(acc.process_index), map_location="cpu", weights_only=True)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot resume {self.run_dir} from {ckpt}: {damaged_file(ckpt) or one_line(e)}. "
                                  + alternatives(self.run_dir, ckpt)) from e
        acc.wait_for_everyone()
        if self.is_main:
            try:
                promote_checkpoint(ckpt, self.dir / "last")
                tidy_checkpoints(self.dir)
            except OSError as e:
                raise RunDirError(self.io_error(e, self.dir, state["epoch"])) from None
        acc.wait_for_everyone()
        return ckpt, {k: v for k, v in state.items() if k != "format"}, progress

    def describe_last(self) -> str:
        """Where the run can continue from: checkpoints/last and its epoch and step, for messages."""
        ckpt, state = find_checkpoint(self.dir, "last")
        if ckpt is None:
            return "no checkpoint was written yet"
        inside = f", batch {state['batch']}" if "batch" in state else ""
        return f"the last checkpoint is {ckpt} (epoch {state['epoch']}{inside}, step {state.get('step', 0)})"

    def load(self, name: str) -> None:
        """Load checkpoints/NAME (complete by construction) into the accelerator's objects."""
        self.accelerator.load_state(str(self.dir / name))

    def first_error(self, error: str | None) -> str | None:
        """The first rank's error message, on every rank (a collective: no rank is left waiting at a barrier)."""
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object
            error = next((e for e in gather_object([error]) if e), None)
        return error

    def io_error(self, e: OSError, path: Path, epochs_done: int) -> str:
        where = e.filename or path
        tail = (f"{self.run_dir} keeps its last complete checkpoint (after {epochs_done} epoch(s)): fix this, then "
                f"continue with --resume {self.run_dir}" if self.dir.exists()
                else "choose another --out or fix its permissions / free space")
        return f"cannot write {where}: {e.strerror or e}; {tail}"


def progress_file(rank: int) -> str:
    return f"progress_rank{rank}.pt"


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
        raise CheckpointError(f"{path} is truncated or corrupt ({one_line(e)}). "
                              + alternatives(ckpt.parent.parent, ckpt)) from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise CheckpointError(f"{path} is not a fasttrain trainer state. " + alternatives(ckpt.parent.parent, ckpt))
    return state


def find_checkpoint(ckdir: Path, name: str) -> tuple[Path | None, dict]:
    """The newest complete checkpoint of NAME: NAME itself, or - after a kill inside a save -
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
            return f"{path} is truncated or corrupt ({one_line(e)})"
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
        with atomic_file(path, fsync=True) as f:
            f.write("".join(f"{line}\n" for line in keep))


def fsync_tree(root: Path) -> None:
    """Flush a freshly written checkpoint to disk before it is marked complete."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def free_space(path: Path) -> str:
    try:
        probe = next(p for p in (path, *path.parents) if p.exists())
        return f" ({shutil.disk_usage(probe).free / 2 ** 20:.1f} MiB free on {probe})"
    except (OSError, StopIteration):
        return ""


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__
