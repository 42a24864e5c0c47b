"""Per-process resources and math settings, decided once per run.

- Cores: every process on a node gets its share, `cores of the node / LOCAL_WORLD_SIZE` (the processes
  `accelerate launch` / torchrun started on this node), never all of them: 8 ranks each starting 32 loader
  threads on a 32-core node would fight over the cores. Loader workers, DALI threads and torch's intra-op
  threads all default to that share.
- `--sync-bn true`: BatchNorm -> SyncBatchNorm under DDP, for small per-GPU batches (statistics over the
  global batch); one process: nothing to synchronise, the model is left as it is.
- cuDNN: `benchmark` on (training shapes are fixed: drop_last), off with `--deterministic true`, which also
  asks for deterministic algorithms. TF32 matmuls / convolutions allowed unless `--tf32 false`.
"""
from __future__ import annotations

import os

import torch


def local_world_size() -> int:
    """Processes on this node (LOCAL_WORLD_SIZE, set by accelerate launch and torchrun; 1 otherwise)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def cores_per_process() -> int:
    """This process's share of the cores it may run on: usable cores / processes on the node (>= 1)."""
    return max(1, len(os.sched_getaffinity(0)) // local_world_size())


def configure_math(deterministic: bool, tf32: bool) -> None:
    """cuDNN autotuning and TF32 (see the module docstring). Safe on machines without CUDA."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def configure_threads(workers: int) -> dict:
    """Set torch's intra-op threads to this process's share (unless OMP_NUM_THREADS says otherwise);
    returns what the process uses."""
    share = cores_per_process()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(share)
    return {"cores_per_process": share, "local_processes": local_world_size(),
            "loader_workers": workers or share, "torch_threads": torch.get_num_threads()}


def sync_batchnorm(model: torch.nn.Module, method: str, num_processes: int, device: torch.device) -> torch.nn.Module:
    """`--sync-bn true`: every BatchNorm of `model` becomes a SyncBatchNorm when there are several processes."""
    if method == "moco":
        raise ValueError("--sync-bn true would undo MoCo's shuffling BN (the key encoder's statistics must stay "
                         "per process); leave --sync-bn false for --method moco")
    if num_processes == 1:
        return model
    if device.type == "cpu":
        raise ValueError("--sync-bn true needs GPUs (torch's SyncBatchNorm does not run on CPU processes); "
                         "leave it false on CPU")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
