"""Run under `accelerate launch` with two processes. Stages the race of fasttrain/entry.py (rule 3) so that it
happens every time, the way it happened in a finished two-process run: rank 1's gloo worker thread finishes a
collective while rank 1 is exiting, and releasing that collective's tensor (made in Python) needs the GIL.

Rank 1 starts an all-reduce and ends; rank 0 joins the all-reduce 0.5 s later. In a normal exit, rank 1's
last exit handler holds the GIL for 2 s without running Python code, so the worker, done with the all-reduce,
waits for the GIL until the interpreter has begun to finalise; the finaliser below then hands the GIL over,
and the worker is stopped mid-release: "terminate called without an active exception", SIGABRT.

argv[1]: "entry" (rank 1 ends through fasttrain.entry.end_process) or "plain" (a normal interpreter exit).
Rank 0 ends with end_process(0) either way, whatever its all-reduce gave (an error once rank 1 is gone)."""
import atexit
import ctypes

# registered before any other exit handler, so it runs last: usleep through PyDLL keeps the GIL for 2 s
atexit.register(ctypes.PyDLL(None).usleep, 2_000_000)

import datetime  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from fasttrain.entry import end_process  # noqa: E402

mode = sys.argv[1]
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
rank = dist.get_rank()
store = dist.distributed_c10d._get_default_store()


class SlowFinaliser:
    """Collected while the interpreter finalises: Python code that lets a waiting thread take the GIL."""
    def __del__(self):
        time.sleep(0.5)


if rank == 1:
    work = dist.all_reduce(torch.ones(4), async_op=True)  # completes when rank 0 joins, 0.5 s from now
    del work
    finaliser = SlowFinaliser()
    store.set("rank1_ending", "1")
    print("rank 1 ending", flush=True)
    if mode == "entry":
        end_process(0)
else:
    store.wait(["rank1_ending"])
    time.sleep(0.5)
    try:
        dist.all_reduce(torch.ones(4))
        print("rank 0: all-reduce completed", flush=True)
    except Exception as e:  # noqa: BLE001 - rank 1 has ended: its connection is closed
        print(f"rank 0: all-reduce failed ({type(e).__name__})", flush=True)
    end_process(0)
