"""Counting the operations that force a device-to-host synchronisation (or put host data into a step).

On a GPU these stall the CPU until the device has caught up; on the CPU the same operations are visible to a
`TorchDispatchMode` or to patched Python entry points, so the count is proven here without a GPU:
  - `_local_scalar_dense` (`.item()`, `int(t)`, `float(t)`, `bool(t)`, `if t:`), `equal`, `is_nonzero`;
  - data-dependent shapes: `nonzero` (also `torch.where(mask)`, `argwhere`), `masked_select`, `unique*`,
    `repeat_interleave` with tensor repeats, `bincount`, indexing with a boolean mask (`index` / `index_put`
    with a bool index);
  - host data entering the step: `lift_fresh` (`torch.tensor(...)`, `torch.as_tensor`, `torch.from_numpy`);
  - copies to the host: `Tensor.tolist()`, `.cpu()`, `.numpy()` (also `np.asarray(t)`), `.to(<the CPU>)`
    (patched while counting), and at dispatch level `_to_copy` / `copy_` between the CPU and another device
    (only on a GPU). On a CPU run the training device IS the host, so `.to(x.device)` cannot be told from
    `.to("cpu")` by its target: `.to(...)` with a CPU target is recorded unless it is called from the loaders'
    stage-2 code (`fasttrain/data/base.py`, `augment.py`) or from torch / Accelerate, whose targets there are
    the device of the tensors at hand (`self.device`, `x.device`, `grad.device`: the GPU on a GPU);
  - explicit waits: `torch.cuda.synchronize`, `torch.cuda.Stream.synchronize`, `torch.cuda.Event.synchronize`,
    `torch.accelerator.synchronize` (patched while counting; on a CPU build they only record);
  - all of the above in other threads too: a thread started while counting runs under the counter (its
    events are tagged `[thread]`); a thread started by a paused region (a loader's stage 1) is paused too.

`SyncCounter.watch_loaders()` pauses the count during a loader's host-side stage 1 (decoding, which is host
work by design: FFCV's and the torch DataLoader's iteration, DALI's CPU pipeline) and its once-per-epoch start,
so that stage 2 (`LoaderBase._batch`) is counted with the step. Stage 1 that runs on the device is counted:
the device loader's gather (`index_select` of the resident split) and DALI's GPU outputs (`_to_torch`).
"""
from __future__ import annotations

import sys
import threading
from collections import Counter
from contextlib import ExitStack, contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "unique", "_unique",
            "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave", "bincount", "lift_fresh"}
MASKABLE = {"index", "index_put", "index_put_", "_index_put_impl_"}
COPIES = {"_to_copy", "copy_"}
PATCHED = ("tolist", "cpu", "numpy")
# (owner, attribute, event name): host-blocking waits, patched to record (and to run only where CUDA is)
WAITS = ((torch.cuda, "synchronize", "cuda.synchronize"), (torch.cuda.Stream, "synchronize", "Stream.synchronize"),
         (torch.cuda.Event, "synchronize", "Event.synchronize"),
         (torch.accelerator, "synchronize", "accelerator.synchronize"))
STAGE2_MODULES = {"fasttrain.data.base", "fasttrain.data.augment"}
LIBRARIES = ("torch.", "accelerate.")


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


def host_stage1(loader) -> bool:
    """Whether `loader`'s stage 1 (`_decoded`) is host work by design (paused while counting)."""
    if loader.kind == "dali":
        return not loader.gpu                        # GPU outputs (mixed decoding) are counted
    return loader.kind in ("ffcv", "torch")          # the device loader's gather is device work: counted


class _ThreadMode(TorchDispatchMode):
    """The dispatch side of a SyncCounter, one per thread (dispatch modes are thread-local)."""

    def __init__(self, counter: "SyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        out = func(*args, **kwargs)
        if name in SYNC_OPS:
            self.counter.record(name)
        elif name in MASKABLE and len(args) > 1 and _has_mask(args[1]):
            self.counter.record(f"{name}[bool mask]")
        elif name in COPIES:
            devices = _devices(args) | _devices(out)
            if "cpu" in devices and len(devices) > 1:
                self.counter.record(f"{name}[{'/'.join(sorted(devices))}]")
        return out


class SyncCounter:
    """Records (phase, op) for every synchronising operation while counting and not paused (per thread)."""

    def __init__(self):
        self.events: list[tuple[object, str]] = []
        self.phase: object = "setup"
        self.active = False
        self._local = threading.local()

    def _paused(self) -> int:
        return getattr(self._local, "paused", 0)

    def record(self, op: str) -> None:
        if self.active and not self._paused():
            tag = "" if threading.current_thread() is threading.main_thread() else "[thread]"
            self.events.append((self.phase, op + tag))

    @contextmanager
    def pause(self):
        self._local.paused = self._paused() + 1
        try:
            yield
        finally:
            self._local.paused -= 1

    @contextmanager
    def counting(self):
        """Active: the dispatch mode in this thread and in threads started meanwhile, plus the patches."""
        with ExitStack() as stack:
            for name in PATCHED:
                stack.enter_context(self._patch(torch.Tensor, name, self._recording_method(name)))
            stack.enter_context(self._patch(torch.Tensor, "to", self._recording_to()))
            for owner, name, event in WAITS:
                stack.enter_context(self._patch(owner, name, self._recording_wait(getattr(owner, name), event)))
            stack.enter_context(self._patch(threading.Thread, "start", self._counted_start(threading.Thread.start)))
            stack.enter_context(_ThreadMode(self))
            self.active = True
            try:
                yield self
            finally:
                self.active = False

    @staticmethod
    @contextmanager
    def _patch(owner, name: str, replacement):
        original = owner.__dict__[name] if name in owner.__dict__ else getattr(owner, name)
        had_own = name in owner.__dict__
        setattr(owner, name, replacement)
        try:
            yield
        finally:
            if had_own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)

    def _recording_method(self, name: str):
        original = getattr(torch.Tensor, name)
        counter = self

        def method(tensor, *args, **kwargs):
            counter.record(name)
            with counter.pause():
                return original(tensor, *args, **kwargs)
        return method

    def _recording_to(self):
        original = torch.Tensor.to
        counter = self

        def to(tensor, *args, **kwargs):
            device = torch._C._nn._parse_to(*args, **{k: v for k, v in kwargs.items() if k != "copy"})[0]
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if device is not None and device.type == "cpu" and (tensor.device.type != "cpu" or not (
                    caller in STAGE2_MODULES or caller.startswith(LIBRARIES))):
                counter.record("to[cpu]")
                with counter.pause():                  # one event, not another one for the `_to_copy` inside
                    return original(tensor, *args, **kwargs)
            return original(tensor, *args, **kwargs)
        return to

    def _recording_wait(self, original, event: str):
        counter = self

        def wait(*args, **kwargs):
            counter.record(event)
            if torch.cuda.is_available():
                return original(*args, **kwargs)
        return wait

    def _counted_start(self, original_start):
        counter = self

        def start(thread):
            paused, run = counter._paused() > 0, thread.run

            def counted_run():
                counter._local.paused = 1 if paused else 0
                with _ThreadMode(counter):
                    run()
            thread.run = counted_run
            return original_start(thread)
        return start

    def by_phase(self) -> dict[object, Counter]:
        out: dict[object, Counter] = {}
        for phase, op in self.events:
            out.setdefault(phase, Counter())[op] += 1
        return out

    @contextmanager
    def watch_loaders(self):
        """Pause the count during every loader's host-side stage 1 and its epoch start (host work by design)."""
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
        """`_decoded` paused where it is host work (`host_stage1`), counted where it runs on the device."""
        counter = self

        def generator(loader, *args, **kwargs):
            if not host_stage1(loader):
                yield from fn(loader, *args, **kwargs)
                return
            with counter.pause():
                it = fn(loader, *args, **kwargs)
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
