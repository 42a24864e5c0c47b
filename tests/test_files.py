"""fasttrain/files.py: every run file (config.yaml, metrics.json, confusion.npz, per_class.png, results.json,
pseudo_labels.npz, checkpoint state) is written through atomic_file."""
from __future__ import annotations

import pytest

from fasttrain.files import atomic_file


def test_a_finished_block_replaces_the_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with atomic_file(path, fsync=True) as f:
        f.write("new")
        assert path.read_text() == "old"    # catches: writing in place (a reader would see a half-written file)
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_an_error_leaves_the_old_file_and_no_temporary(tmp_path):
    """Catches: renaming whatever was written when the block fails, or leaving .NAME.tmp behind."""
    path = tmp_path / "confusion.npz"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(path, "wb") as f:
            f.write(b"half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["confusion.npz"]
