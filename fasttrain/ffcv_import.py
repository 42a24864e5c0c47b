"""Import FFCV without its side effect on torch.

`ffcv.pipeline.compiler` calls `torch.set_num_threads(1)` when it is imported, which leaves every later CPU
op of the process single-threaded (measured: CPU training at half speed after a conversion in the same
process). Import this module before anything from `ffcv`; FFCV loaders still set the thread count to their
`num_workers` while they iterate.
"""
import torch

_threads = torch.get_num_threads()
import ffcv.pipeline.compiler  # noqa: E402,F401

torch.set_num_threads(_threads)
