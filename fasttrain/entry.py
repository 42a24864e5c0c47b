"""How a fasttrain command ends its process. Every entry point (the recipes, `python -m fasttrain.evaluate`)
runs its main function through `run_main(main, *args)`; a script that drives the engine itself ends with
`end_process(0)`.

Rules.
1. The exit code: main's return value when it is an int, else 0 (a status such as "done"); the code of a
   SystemExit it raises (argparse and `user_errors`: 2 for a mistake, 3 diverged, 75 interrupted); 1 after
   an uncaught exception, whose traceback is printed first.
2. One process: the interpreter exits as usual, by SystemExit (an in-process caller, a test, catches it);
   an uncaught exception propagates unchanged.
3. Several processes (WORLD_SIZE > 1: accelerate launch, torchrun, srun): stdout, stderr and logging are
   flushed and the process ends at once with os._exit(code), skipping interpreter finalisation. What a run
   writes is complete by then: run files and checkpoints are closed and renamed into place when written,
   trackers are finished by `end_training`. Python threads still running are not joined (fasttrain leaves
   none: loaders are closed when their run ends).

Why rule 3. A gloo worker thread drops its handle on a finished collective, and with it the tensors, some
time after the rank that waited on the collective has moved on. Releasing a tensor made in Python takes the
GIL (torch's PyObject bookkeeping), and before CPython 3.14 a thread that asks for the GIL while the
interpreter finalises is stopped with pthread_exit, whose unwinding through C++ frames ends in
std::terminate: "terminate called without an active exception", SIGABRT, and a failed launch after a
finished run. Nothing joins those threads before finalisation: DDP keeps the gloo process group alive after
destroy_process_group (torch 2.13). On a loaded node the race is lost now and then; a rank that does not
finalise cannot lose it. tests/test_entry.py stages the race and shows both outcomes.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Callable, NoReturn


def distributed() -> bool:
    """Started as one of several processes (WORLD_SIZE, set by accelerate launch / torchrun / srun wrappers)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def run_main(main: Callable, *args, **kwargs) -> NoReturn:
    """Run a command's main function and end the process with its exit code (rules 1-3)."""
    if not distributed():
        raise SystemExit(_return_code(main(*args, **kwargs)))
    try:
        code = _return_code(main(*args, **kwargs))
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:  # noqa: BLE001 - any failure ends this rank with code 1, its traceback printed
        traceback.print_exc()
        code = 1
    end_process(code)


def end_process(code: int = 0) -> NoReturn:
    """End this process with `code`: SystemExit for one process, os._exit after flushing for several."""
    if not distributed():
        raise SystemExit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def _return_code(result) -> int:
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _exit_code(code) -> int:
    """As the interpreter maps SystemExit.code: None -> 0, an int as is, anything else printed -> 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
