"""Stopping a run cleanly: SIGTERM / SIGUSR1 (preemption, a time limit) and a non-finite training loss.

Signals. While `Engine.fit` runs, SIGTERM and SIGUSR1 only record that a stop was asked for (SLURM sends
one of them before a preemption or the time limit with `--signal`; `accelerate launch` / torchrun forwards
SIGTERM to every worker, and SIGUSR1 when TORCHELASTIC_SIGNALS_TO_HANDLE names it). The run finishes the
optimiser step in progress, writes checkpoints/last at that step (inside the epoch: it holds the batch
number, and per rank the epoch's running sums; see fasttrain/checkpoints.py), logs one line and returns
"interrupted"; a recipe then exits with EXIT_INTERRUPTED. The same command (`--resume RUN`; for a chain,
the chain's command) continues at that step and gives what the uninterrupted run gives. A second signal
(the launcher forwarding what the node already sent, a repeated scancel) changes nothing: the save in
progress completes. A signal during an evaluation or an epoch's checkpoint takes effect when that is done.
SIGKILL cannot be caught: the checkpoint protocol then leaves the previous complete checkpoint. torchrun
sends SIGKILL TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) after forwarding SIGTERM.

Non-finite loss. The engine reads the epoch's running loss sum once per log step (--log-every); a NaN or
infinite loss at any step makes that sum non-finite, so the flag costs no read of its own. The run stops at
the first log step that sees it: `Diverged` (EXIT_DIVERGED) names the epoch, step, lr and the last
checkpoint, which was written before (every log step up to it was finite; an epoch's last step is a log
step), so neither `last` nor `best` holds the diverged model. `--nonfinite-loss continue` trains on; an
epoch whose mean loss is not finite is then never selected as the best.

Agreement between ranks. Every rank must leave the loop after the same step (the save is a collective).
One process reads its flags after each optimiser step. Several: after each optimiser step every rank starts
an all-reduce (MAX) of its two flags on a gloo (CPU) process group, asynchronously, and first waits for the
one it started after the PREVIOUS step, long finished by then; every rank decides on the same values, one
step after a flag was raised. Cost per step: one 8-byte CPU all-reduce in gloo's thread, no device->host
copy (the flags are host values) and no wait for the network. At the end of an epoch one blocking
all-reduce settles the flags of its last step. (Agreeing only at log steps would stop up to --log-every
steps late, against torchrun's 30 s; an all-reduce of device flags would need a read-back every step.)
"""
from __future__ import annotations

import math
import signal
import threading
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_INTERRUPTED = 75   # stopped by SIGTERM / SIGUSR1 with a checkpoint at the step (sysexits' EX_TEMPFAIL)
EXIT_DIVERGED = 3       # the training loss became NaN or infinite

_CPU_GROUPS: dict = {}


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; the message names epoch, step, lr and the last checkpoint."""


class StopRequests:
    """This rank's stop flags (a signal received, a non-finite loss seen) and the ranks' agreement on them."""

    def __init__(self, num_processes: int, watch_loss: bool = True):
        self.signal: int | None = None       # the first SIGTERM / SIGUSR1 received by this process
        self.nonfinite = False               # a log step of this rank read a non-finite loss
        self.watch_loss = watch_loss
        self.group = _cpu_group() if num_processes > 1 else None
        self._flags = np.zeros(2, np.int32)  # all-reduced in place through a tensor sharing its memory
        self._buffer = torch.from_numpy(self._flags)
        self._pending = None                 # the all-reduce started after the previous step

    @contextmanager
    def catching_signals(self):
        """SIGTERM and SIGUSR1 are recorded (not fatal) inside; the previous handlers are back afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._record) for s in SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _record(self, signum, frame) -> None:
        if self.signal is None:  # a later signal changes nothing
            self.signal = signum

    def saw_loss(self, value: float) -> None:
        """The running loss read at a log step."""
        if self.watch_loss and not math.isfinite(value):
            self.nonfinite = True

    def signal_name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "a signal to another rank"

    def poll(self) -> str | None:
        """After an optimiser step: "nonfinite", "signal" or None (go on), the same on every rank."""
        if self.group is None:
            return _reason(self._local())
        agreed = self._wait()
        if not any(agreed):
            self._flags[:] = self._local()
            self._pending = dist.all_reduce(self._buffer, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return _reason(agreed)

    def settle(self) -> str | None:
        """As `poll`, for the flags every rank holds now (blocking; at the end of an epoch)."""
        if self.group is None:
            return _reason(self._local())
        self._wait()
        self._flags[:] = self._local()      # flags never clear: these include what the pending one carried
        dist.all_reduce(self._buffer, op=dist.ReduceOp.MAX, group=self.group)
        return _reason(self._flags.tolist())

    def _local(self) -> list[int]:
        return [int(self.signal is not None), int(self.nonfinite)]

    def _wait(self) -> list[int]:
        if self._pending is None:
            return [0, 0]
        self._pending.wait()
        self._pending = None
        return self._flags.tolist()


def _reason(flags: list[int]) -> str | None:
    return "nonfinite" if flags[1] else "signal" if flags[0] else None


def _cpu_group():
    """A gloo process group over all ranks: the default group when it is gloo, else one made once."""
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    world = dist.group.WORLD
    if world not in _CPU_GROUPS:
        _CPU_GROUPS[world] = dist.new_group(backend="gloo")
    return _CPU_GROUPS[world]
