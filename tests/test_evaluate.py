"""Evaluation: the metrics, the sparse confusion matrix and its file, the report files, and that nothing of size
C x C is allocated or written at iNaturalist's 8,142 classes."""
from __future__ import annotations

import json
import re
import resource

import numpy as np
import pytest
import torch
from PIL import Image

from fasttrain.confusion import Confusion
from fasttrain.data.batch import Batch
from fasttrain.evaluate import evaluate, summarize, write_report


class ListLoader:
    """Stands in for an eval loader: fixed batches, every image once."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int):
        self.batches = [Batch((features[i:i + batch_size],), labels[i:i + batch_size], torch.arange(i, i + batch_size))
                        for i in range(0, len(labels), batch_size)]

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        return iter(self.batches)


def old_dense_evaluation(model, loader, num_classes):
    """The dense computation: a C x C matrix filled with index_put_ on the device, and the top-5 hits."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    top5 = 0
    with torch.no_grad():
        for batch in loader:
            logits = model(batch.images).float()
            confusion.index_put_((batch.labels, logits.argmax(1)), torch.ones_like(batch.labels), accumulate=True)
            top5 += int((logits.topk(min(5, num_classes), 1).indices == batch.labels[:, None]).any(1).sum())
    return confusion.numpy(), top5


def test_summarize_groups_and_accuracies():
    # 3 classes with 150 / 50 / 5 training images -> many / medium / few
    dense = np.array([[8, 2, 0], [1, 4, 5], [0, 0, 10]])
    rows, cols = np.nonzero(dense)
    labels, predictions = np.repeat(rows, dense[rows, cols]), np.repeat(cols, dense[rows, cols])
    m = summarize(Confusion.from_pairs(labels, predictions, 3), 30, [150, 50, 5])
    assert m["top1"] == 100 * 22 / 30 and m["top5"] == 100 and m["num_eval_images"] == 30
    assert m["many"] == 80 and m["medium"] == 40 and m["few"] == 100
    assert m["per_class"] == [80, 40, 100] and m["group_sizes"] == {"many": 1, "medium": 1, "few": 1}


def test_empty_group_is_none_and_thresholds_configurable():
    confusion = Confusion.from_pairs(np.repeat([0, 1], 5), np.repeat([0, 1], 5), 2)
    m = summarize(confusion, 10, [30, 40])
    assert m["many"] is None and m["few"] is None and m["medium"] == 100
    m = summarize(confusion, 10, [30, 40], many=35, few=31)
    assert m["many"] == 100 and m["few"] == 100 and m["medium"] is None


def test_a_class_without_eval_images_is_none():
    m = summarize(Confusion.from_pairs([0, 0, 2], [0, 1, 2], 3), 3, [5, 5, 5])
    assert m["per_class"] == [50.0, None, 100.0] and m["top1"] == pytest.approx(100 * 2 / 3)


def test_sparse_confusion_and_its_file_equal_the_dense_computation(tmp_path):
    torch.manual_seed(0)
    num_classes, n = 7, 90
    model = torch.nn.Linear(5, num_classes)
    features, labels = torch.randn(n, 5), torch.randint(0, num_classes, (n,))
    loader = ListLoader(features, labels, batch_size=16)
    dense, top5 = old_dense_evaluation(model, loader, num_classes)
    metrics, confusion = evaluate(model, loader, num_classes, [9] * num_classes)
    np.testing.assert_array_equal(confusion.dense(), dense)
    assert metrics["top1"] == 100 * np.trace(dense) / n and metrics["top5"] == 100 * top5 / n
    assert metrics["per_class"] == [100 * dense[c, c] / dense[c].sum() if dense[c].sum() else None
                                    for c in range(num_classes)]

    confusion.save(tmp_path / "confusion.npz")
    with np.load(tmp_path / "confusion.npz") as z:              # a reader with numpy alone (README)
        assert set(z.files) == {"rows", "cols", "counts", "shape", "layout"} and tuple(z["shape"]) == dense.shape
        matrix = np.zeros(z["shape"], dtype=np.int64)
        matrix[z["rows"], z["cols"]] = z["counts"]
        keys = z["rows"] * num_classes + z["cols"]
        assert (np.diff(keys) > 0).all() and (z["counts"] > 0).all()   # unique, sorted, no zero entries
        from scipy.sparse import coo_matrix
        from_scipy = coo_matrix((z["counts"], (z["rows"], z["cols"])), shape=tuple(z["shape"])).toarray()
    np.testing.assert_array_equal(matrix, dense)
    np.testing.assert_array_equal(from_scipy, dense)
    np.testing.assert_array_equal(Confusion.load(tmp_path / "confusion.npz").dense(), dense)
    np.save(tmp_path / "confusion.npy", dense)                 # the dense file of older run directories
    np.testing.assert_array_equal(Confusion.load(tmp_path / "confusion.npy").dense(), dense)


def _vm_data() -> int:
    return int(re.search(r"VmData:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def test_inat_sized_evaluation_allocates_and_writes_nothing_of_c_squared(tmp_path):
    """8,142 classes, 2 eval images each: a C x C int64 matrix would be 506 MiB; evaluation and the report run
    with 256 MiB of address space to spare, and every file they write is linear in C or in the eval images."""
    import matplotlib.pyplot  # noqa: F401  (imported before the limit: it is not what is measured)
    torch.manual_seed(0)
    num_classes, per_class = 8142, 2
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    model = torch.nn.Linear(4, num_classes)
    loader = ListLoader(torch.randn(len(labels), 4), labels, batch_size=512)
    counts = np.maximum(2, (1000 * 0.002 ** (np.arange(num_classes) / (num_classes - 1))).astype(int))
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (_vm_data() + 256 * 2**20, hard))
    try:
        metrics, confusion = evaluate(model, loader, num_classes, counts)
        metrics.update(epoch=0, split="val")
        write_report(tmp_path, metrics, confusion, counts, epochs=1)
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    n = len(labels)
    assert metrics["num_eval_images"] == n and len(metrics["per_class"]) == num_classes
    assert confusion.counts.sum() == n and len(confusion.rows) <= n
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    assert set(sizes) == {"metrics.json", "confusion.npz", "per_class.png"}
    assert sizes["confusion.npz"] <= 24 * n + 4096                 # three int64 per entry, at most one per image
    assert sizes["metrics.json"] <= 64 * num_classes + 8192        # the two per-class vectors, once each
    assert sizes["per_class.png"] <= 200_000
    assert "val accuracy" in Image.open(tmp_path / "per_class.png").text["Title"]


def test_report_keeps_each_per_class_vector_once_and_the_plot_names_its_split(tmp_path):
    confusion = Confusion.from_pairs([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], 3)
    final = summarize(confusion, 5, [150, 50, 5]) | {"epoch": 9, "split": "val"}
    same = dict(final) | {"selected_on": "val", "selection_top1": final["top1"]}
    report = write_report(tmp_path, final, confusion, [150, 50, 5], best=same, epochs=10)
    text = (tmp_path / "metrics.json").read_text()
    assert json.loads(text) == report and text.count('"per_class"') == 1 and text.count('"train_class_counts"') == 1
    assert report["per_class"] == final["per_class"] and "per_class" not in report["final"] | report["best"]
    assert report["final"]["label"] == "final epoch (epoch 10/10, val)" and report["best"]["epoch"] == 9
    assert "layout" in report
    title = Image.open(tmp_path / "per_class.png").text["Title"]
    assert title.startswith("val accuracy per class") and "test" not in title

    earlier = summarize(Confusion.from_pairs([0, 1, 2], [0, 0, 0], 3), 3, [150, 50, 5]) | {"epoch": 4, "split": "val"}
    report = write_report(tmp_path, final, confusion, [150, 50, 5], epochs=10,
                          best=earlier | {"selected_on": "val", "selection_top1": 40.0})
    assert report["best"]["per_class"] == [100.0, 0.0, 0.0] != report["per_class"]   # another epoch: its own
    assert (tmp_path / "metrics.json").read_text().count('"per_class"') == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.npz", "metrics.json", "per_class.png"]


def test_evaluation_reads_the_device_once_after_the_last_batch():
    """No host synchronisation per batch (tests/sync_counter.py): the per-image triples stay on the device and
    are read back once, after the loop."""
    from sync_counter import SyncCounter
    counter = SyncCounter()

    class Phased(ListLoader):
        def __iter__(self):
            for i, batch in enumerate(self.batches):
                counter.phase = i
                yield batch
            counter.phase = "end"

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 6)
    loader = Phased(torch.randn(40, 5), torch.randint(0, 6, (40,)), batch_size=8)
    with counter.counting():
        metrics, _ = evaluate(model, loader, 6, [10] * 6)
    events = counter.by_phase()
    assert all(not events.get(i) for i in range(5)), events
    assert dict(events["end"]) == {"cpu": 1, "numpy": 1} and metrics["num_eval_images"] == 40


def test_per_class_plot_bins_never_straddle_a_shot_boundary():
    from fasttrain.evaluate import _count_bins
    counts = np.maximum(2, (1000 * 0.002 ** (np.arange(8142) / 8141)).astype(int))
    edges = _count_bins(counts, many=100, few=20)
    which = np.searchsorted(edges, counts, side="right") - 1
    group = np.where(counts > 100, 2, np.where(counts < 20, 0, 1))
    assert all(len(set(group[which == b])) == 1 for b in np.unique(which))
    assert 5 <= len(np.unique(which)) <= 25 and edges[0] <= counts.min() and edges[-1] > counts.max()
