"""Writing a file so that no reader ever sees it half-written: `atomic_file(path)`.

The block writes `.NAME.tmp` beside `path`; when it ends without an error the file is renamed to `path` (one
os.replace: the old content or the new, never a mixture). An error removes the temporary file and leaves `path`
as it was. `fsync=True` also flushes the content to disk before the rename (checkpoint files, whose rename marks
them complete). A kill leaves at most the `.NAME.tmp`, which the next write replaces.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | Path, mode: str = "w", *, fsync: bool = False):
    """Open `.NAME.tmp` for writing ("w" text, "wb" bytes) and rename it to `path` when the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
