"""The supervised CIFAR recipe, with a signal sent to this process at a chosen step (what SLURM's `--signal` or
a preemption does), for `python` and `accelerate launch`:

    signalled_recipe.py EPOCH BATCH RANK SIGNAL SECOND -- RECIPE ARGS...

sends SIGNAL (TERM, USR1) to this process while it computes the loss of batch BATCH (0-based) of EPOCH on
rank RANK (-1: every rank); SECOND = 1 sends it again during the checkpoint save that follows."""
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "recipes"))
from presets import CIFAR  # noqa: E402

from accelerate import Accelerator  # noqa: E402

from fasttrain.chain import process_state, run_single  # noqa: E402
from fasttrain.entry import run_main  # noqa: E402
from fasttrain.methods.supervised import Supervised  # noqa: E402

epoch_at, batch_at, rank, name, second = sys.argv[1:6]
sig = getattr(signal, f"SIG{name}")
calls: dict[int, int] = {}
sent = []
real_loss, real_save = Supervised.loss, Accelerator.save_state


def loss(self, model, batch, epoch):
    calls[epoch] = calls.get(epoch, 0) + 1
    if (epoch, calls[epoch] - 1) == (int(epoch_at), int(batch_at)) and int(rank) in (-1, process_state().process_index):
        sent.append(sig)
        os.kill(os.getpid(), sig)
    return real_loss(self, model, batch, epoch)


def save_state(self, output_dir, **kwargs):
    result = real_save(self, output_dir, **kwargs)
    if sent and second == "1":
        os.kill(os.getpid(), sig)          # a second signal while the checkpoint is being written
    return result


Supervised.loss, Accelerator.save_state = loss, save_state
run_main(run_single, CIFAR, "signalled", argv=sys.argv[sys.argv.index("--") + 1:])
