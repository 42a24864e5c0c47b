"""What every loader shares: the epoch's positions for this rank, batch count, seeding, stage 2."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator, Sequence

import numpy as np
import torch

from fasttrain.data import augment
from fasttrain.data.augment import ViewSpec
from fasttrain.data.batch import Batch
from fasttrain.data.sampling import SAMPLERS, check_rank, epoch_order, shard_eval, shard_train
from fasttrain.data.shards import ShardReader
from fasttrain.dataset import DatasetDir, DatasetError
from fasttrain.runtime import cores_per_process


def default_workers() -> int:
    """This process's share of the node's cores (cores / processes on the node), not every core."""
    return cores_per_process()


def derive_seed(*values: int) -> int:
    """A 63-bit seed that is a pure function of `values` (e.g. seed, epoch, rank)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> np.uint64(1))


STAGE2 = 2   # the last value of stage 2's seeds (seed, epoch, rank, batch, STAGE2): apart from stage 1's


class LoaderBase(ABC):
    """Order, sharding, length, seeding and the final Batch; subclasses only read and decode.

    A subclass implements `_decoded(positions)`: an iterator over the epoch's batches, each a list of
    uint8 N x H x W x C tensors, one per view (raw sets: the same tensor for every view), in the order of
    `positions` cut into `batch_size` chunks (the last one short for evaluation). A float32 tensor
    instead is a view the backend already finished (normalized N x C x H x W on the device): stage 2,
    which draws no random numbers for such a view, is skipped.

    Every batch is a pure function of (seed, epoch, rank, batch number): the order is the epoch's, stage 1's
    random crops and flips (torch, DALI) are drawn from a generator seeded by (seed, epoch, rank, batch), and
    stage 2's from one seeded by (seed, epoch, rank, batch, STAGE2). So `set_epoch(epoch, first_batch=k)`
    yields exactly the batches k, k+1, ... that a whole pass yields from k on (a run resumed inside an epoch).
    `_decoded` starts at batch `self.first_batch` and numbers batches from there.
    """
    kind = ""

    def __init__(self, dataset: DatasetDir, split: str, *, batch_size: int, views: Sequence[ViewSpec],
                 train: bool, sampler: str = "uniform", sampling_labels: np.ndarray | None = None,
                 positions: np.ndarray | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", channels_last: bool = False, workers: int | None = None,
                 samples_per_class: int = 4, cb_beta: float = 0.9999):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not views:
            raise ValueError("views is empty: pass at least one ViewSpec (e.g. augment.small_train())")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; pick one of {SAMPLERS}")
        check_rank(rank, world_size)
        self.dataset, self.split = dataset, dataset.split(split)
        self.files = dataset.require_files(split, self.kind)
        n = self.split.num_samples
        self.positions = np.arange(n, dtype=np.int64) if positions is None else _check_positions(positions, n)
        if sampling_labels is None:
            sampling_labels = self.split.labels
        elif len(sampling_labels) != n:
            raise ValueError(f"sampling_labels has {len(sampling_labels)} entries; it needs one per position "
                             f"of split {split!r} ({n})")
        self.sampling_labels = np.asarray(sampling_labels, dtype=np.int64)[self.positions]
        self.batch_size, self.views, self.train, self.sampler = batch_size, list(views), train, sampler
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.samples_per_class, self.cb_beta = samples_per_class, cb_beta
        self.device, self.channels_last = torch.device(device), channels_last
        self.workers = workers or default_workers()         # None or 0: this process's share of the cores
        self.is_raw = dataset.is_raw
        if not self.is_raw and not all(v.resizes for v in self.views):
            raise ValueError("jpeg sets have images of different sizes: every view needs crop='rrc' or "
                             "'center' with a size (augment.large_train / large_eval / moco_v2)")
        self.image_shape = (dataset.image["height"], dataset.image["width"], dataset.channels)
        self.mean = augment.stats(dataset.mean, self.device)
        self.std = augment.stats(dataset.std, self.device)
        self._labels = torch.from_numpy(self.split.labels).to(self.device)
        self._source_index = torch.from_numpy(self.split.source_index).to(self.device)
        self.epoch, self.first_batch = 0, 0

    def close(self) -> None:
        """Release the backend's threads, processes and pipelines now (also done when collected); the loader
        stays usable: a later epoch starts them again."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """The next pass yields `epoch`'s batches from number `first_batch` on (0: the whole epoch)."""
        if not 0 <= first_batch <= len(self):
            raise ValueError(f"first_batch {first_batch} is not in 0..{len(self)} (batches in an epoch)")
        self.epoch, self.first_batch = epoch, first_batch

    def epoch_positions(self, epoch: int) -> np.ndarray:
        """File positions this rank reads in `epoch`, in order (training: sampler order, then sharded)."""
        if self.train:
            order = epoch_order(self.sampling_labels, self.sampler, self.seed, epoch, self.samples_per_class,
                                self.cb_beta)
            local = shard_train(order, self.rank, self.world_size)
            local = local[: len(local) // self.batch_size * self.batch_size]
        else:
            local = shard_eval(len(self.positions), self.rank, self.world_size)
        return self.positions[local]

    def __len__(self) -> int:
        if self.train:
            return len(self.positions) // self.world_size // self.batch_size
        return -(-len(shard_eval(len(self.positions), self.rank, self.world_size)) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        positions, on_device, generator = self._start_epoch()
        starts = range(0, len(positions), self.batch_size)
        for number, start, decoded in zip(range(self.first_batch, len(self)), starts, self._decoded(positions)):
            generator.manual_seed(derive_seed(self.seed, self.epoch, self.rank, number, STAGE2))
            yield self._batch(decoded, on_device[start:start + self.batch_size], generator)

    def remaining_positions(self, epoch: int) -> np.ndarray:
        """The positions of `epoch` from batch `first_batch` on (what a pass reads)."""
        return self.epoch_positions(epoch)[self.first_batch * self.batch_size:]

    def _start_epoch(self) -> tuple[np.ndarray, torch.Tensor, torch.Generator]:
        """Once per pass: this rank's remaining positions (host, and on the device in one copy), and the
        stage-2 generator, on the device so that no random draw needs a copy (re-seeded for every batch;
        seeding is host-side bookkeeping, no synchronisation)."""
        positions = self.remaining_positions(self.epoch)
        on_device = torch.from_numpy(positions)
        if self.device.type == "cuda":
            on_device = on_device.pin_memory().to(self.device, non_blocking=True)
        return positions, on_device, torch.Generator(device=self.device)

    def _stage2_spec(self, view: ViewSpec) -> ViewSpec:
        """What stage 2 does for a view of this loader: everything on raw sets, the rest after the
        backend's crop and flip on jpeg sets."""
        return view if self.is_raw else view.after_decode()

    def _batch(self, decoded: list[torch.Tensor], index: torch.Tensor, generator) -> Batch:
        """Stage 2 of one batch; `index`: its positions, on the device. No host synchronisation."""
        sizes = self._valid_sizes(index)
        views = tuple(x if x.is_floating_point() else
                      augment.apply(self._stage2_spec(spec), x.to(self.device, non_blocking=True), generator,
                                    self.mean, self.std, self.channels_last, sizes=sizes)
                      for spec, x in zip(self.views, decoded))
        return Batch(views=views, labels=self._labels[index], indices=self._source_index[index])

    def _shard_reader(self) -> ShardReader:
        reader = ShardReader(self.files)
        if len(reader) != self.split.num_samples:
            raise DatasetError(f"{self.files}: the shards hold {len(reader)} samples but manifest.json says "
                               f"{self.split.num_samples}; re-run `python -m data_prep.convert`")
        return reader

    @abstractmethod
    def _decoded(self, positions: np.ndarray) -> Iterator[list[torch.Tensor]]:
        """The epoch's decoded batches (see the class docstring)."""

    def _valid_sizes(self, index: torch.Tensor) -> torch.Tensor | None:
        """Per image (height, width) of the valid region when images sit in a padded canvas (on the device)."""
        return None


def _check_positions(positions, n: int) -> np.ndarray:
    positions = np.asarray(positions, dtype=np.int64)
    if positions.ndim != 1 or (len(positions) and (positions.min() < 0 or positions.max() >= n)):
        raise ValueError(f"positions must be a 1-D array of positions in 0..{n - 1}")
    return positions
