"""Counting the operations that force a device-to-host synchronisation (or put host data into a step).

On a GPU these stall the CPU until the device has caught up; on the CPU the same operations are visible
to a `TorchDispatchMode`, so the count is proven here without a GPU:
  - `_local_scalar_dense` (`.item()`, `int(t)`, `float(t)`, `bool(t)`, `if t:`), `equal`, `is_nonzero`;
  - data-dependent shapes: `nonzero`, `masked_select`, `unique*`, `repeat_interleave` with tensor repeats,
    `bincount`, indexing with a boolean mask (`index` / `index_put` with a bool index);
  - host data entering the step: `lift_fresh` (`torch.tensor(...)`, `torch.as_tensor`, `torch.from_numpy`);
  - copies between the CPU and another device (`_to_copy` / `copy_`; only seen on a GPU);
  - `Tensor.tolist()`, `.cpu()`, `.numpy()` (no dispatch on the CPU: patched while counting).

`SyncCounter.watch_loaders()` pauses the count during a loader's stage 1 (decoding, which is host work by
design) and its once-per-epoch start, so that stage 2 (`LoaderBase._batch`) is counted with the step.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "unique", "_unique",
            "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave", "bincount", "lift_fresh"}
MASKABLE = {"index", "index_put", "index_put_", "_index_put_impl_"}
COPIES = {"_to_copy", "copy_"}
PATCHED = ("tolist", "cpu", "numpy")


def _devices(value) -> set[str]:
    if isinstance(value, torch.Tensor):
        return {value.device.type}
    if isinstance(value, (list, tuple)):
        return set().union(*(_devices(v) for v in value)) if value else set()
    return set()


def _has_mask(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype in (torch.bool, torch.uint8)
    if isinstance(value, (list, tuple)):
        return any(_has_mask(v) for v in value if v is not None)
    return False


class SyncCounter(TorchDispatchMode):
    """Records (phase, op) for every synchronising operation while active and not paused."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[object, str]] = []
        self.phase: object = "setup"
        self.paused = 0

    def record(self, op: str) -> None:
        if not self.paused:
            self.events.append((self.phase, op))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        out = func(*args, **kwargs)
        if name in SYNC_OPS:
            self.record(name)
        elif name in MASKABLE and len(args) > 1 and _has_mask(args[1]):
            self.record(f"{name}[bool mask]")
        elif name in COPIES:
            devices = _devices(args) | _devices(out)
            if "cpu" in devices and len(devices) > 1:
                self.record(f"{name}[{'/'.join(sorted(devices))}]")
        return out

    @contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    @contextmanager
    def counting(self):
        """Active: the dispatch mode plus the patched Tensor methods."""
        originals = {name: getattr(torch.Tensor, name) for name in PATCHED}

        def patched(name):
            def method(tensor, *args, **kwargs):
                self.record(name)
                with self.pause():
                    return originals[name](tensor, *args, **kwargs)
            return method

        for name in PATCHED:
            setattr(torch.Tensor, name, patched(name))
        try:
            with self:
                yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)

    def by_phase(self) -> dict[object, Counter]:
        out: dict[object, Counter] = {}
        for phase, op in self.events:
            out.setdefault(phase, Counter())[op] += 1
        return out

    @contextmanager
    def watch_loaders(self):
        """Pause the count during every loader's stage 1 and epoch start (host work by design)."""
        from fasttrain.data import KINDS
        from importlib import import_module
        from fasttrain.data import augment
        from fasttrain.data.base import LoaderBase
        classes = [LoaderBase] + [getattr(import_module(m), c) for m, c in KINDS.values()]
        # CPU only: stage 2 allocates its float output through numpy (huge pages), a `lift_fresh` of an empty
        # host buffer, not host data; on a GPU the same line is `torch.empty` on the device.
        saved = [(augment, "_new_float", augment._new_float)]
        augment._new_float = self._paused_call(augment._new_float)
        for cls in classes:
            for name in ("_decoded", "_start_epoch"):
                if name in cls.__dict__:
                    saved.append((cls, name, cls.__dict__[name]))
                    setattr(cls, name, self._paused_generator(cls.__dict__[name]) if name == "_decoded"
                            else self._paused_call(cls.__dict__[name]))
        try:
            yield self
        finally:
            for cls, name, original in saved:
                setattr(cls, name, original)

    def _paused_call(self, fn):
        def call(*args, **kwargs):
            with self.pause():
                return fn(*args, **kwargs)
        return call

    def _paused_generator(self, fn):
        counter = self

        def generator(*args, **kwargs):
            with counter.pause():
                it = fn(*args, **kwargs)
            while True:
                with counter.pause():
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                yield item
        return generator

    def mark_steps(self, loader) -> None:
        """Each stage 2 of `loader` (a training loader) starts the next step: phases 0, 1, 2, ..."""
        original = loader._batch
        self.phase, self._step = "setup", -1

        def batch(*args, **kwargs):
            self._step += 1
            self.phase = self._step
            return original(*args, **kwargs)

        loader._batch = batch
