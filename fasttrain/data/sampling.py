"""Epoch orders and rank sharding, shared by every loader. Pure numpy and deterministic.

An order is an int64 array of *indices into the `labels` array passed in* (0..len(labels)-1); the
loader maps them to file positions when it uses a subset (`positions`).
"""
from __future__ import annotations

import numpy as np

SAMPLERS = ("uniform", "resample", "balanced", "sqrt", "class_aware")


def epoch_order(labels: np.ndarray, sampler: str, seed: int, epoch: int, samples_per_class: int = 4,
                cb_beta: float = 0.9999) -> np.ndarray:
    """The global order of one epoch: identical on every rank for the same (seed, epoch).

    uniform:     a permutation of all samples.
    resample:    the paper's `--train_rule Resample` (ImbalancedDatasetSampler, utils.py): len(labels) draws
                 with replacement, each sample weighted by its class's (1 - beta) / (1 - beta^n_c) (beta =
                 `cb_beta`, the paper's 0.9999), so class c is drawn with probability proportional to
                 n_c (1 - beta) / (1 - beta^n_c): NOT class-uniform (CIFAR-10-LT rho 100: the largest class
                 1.27x as often as the smallest); beta 0 gives the class frequencies of `uniform`.
    balanced:    len(labels) draws; a class uniformly among the classes present (class-balanced sampling,
                 Kang et al. 2020), then a sample uniformly within it (with replacement).
    sqrt:        the same with class probability proportional to sqrt(class count).
    class_aware: len(labels) samples in runs of `samples_per_class` of one class (the Decoupling / paper code's
                 ClassAwareSampler): classes in turn from a shuffled list of the classes present, reshuffled
                 after each pass; each class's run continues its own shuffled list, reshuffled when used up.
    """
    labels = np.asarray(labels)
    n = len(labels)
    rng = np.random.default_rng([seed, epoch])
    if sampler == "uniform":
        return rng.permutation(n).astype(np.int64)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; pick one of {SAMPLERS}")
    if n and labels.min() < 0:
        raise ValueError(f"sampler {sampler!r} needs a label for every sample, got labels < 0 "
                         f"(the unlabeled pool?); pass sampling_labels, e.g. pseudo-labels")
    members = np.argsort(labels, kind="stable")                  # sample indices grouped by class
    classes, starts, counts = np.unique(labels[members], return_index=True, return_counts=True)
    if sampler == "class_aware":
        return _class_aware(members, starts, counts, n, samples_per_class, rng)
    if sampler == "resample":
        if not 0 <= cb_beta < 1:
            raise ValueError(f"cb_beta must be in [0, 1), got {cb_beta}")
        weights = counts * (1.0 - cb_beta) / (1.0 - np.power(cb_beta, counts.astype(np.float64)))
    else:
        weights = np.ones(len(classes)) if sampler == "balanced" else np.sqrt(counts)
    drawn = rng.choice(len(classes), size=n, p=weights / weights.sum())
    within = (rng.random(n) * counts[drawn]).astype(np.int64)
    return members[starts[drawn] + within].astype(np.int64)


def _class_aware(members, starts, counts, n, per_class, rng) -> np.ndarray:
    if per_class < 1:
        raise ValueError(f"samples_per_class must be >= 1, got {per_class}")
    runs, k = -(-n // per_class), len(counts)
    passes = -(-runs // k)
    run_class = np.argsort(rng.random((passes, k)), axis=1).ravel()[:runs]   # shuffled class list, pass by pass
    out = np.empty((runs, per_class), dtype=np.int64)
    runs_by_class = np.argsort(run_class, kind="stable")
    first = np.searchsorted(run_class[runs_by_class], np.arange(k + 1))
    for c in range(k):
        mine = runs_by_class[first[c]:first[c + 1]]
        if not len(mine):
            continue
        need = len(mine) * per_class
        cycles = -(-need // counts[c])                              # passes over this class's shuffled list
        stream = np.argsort(rng.random((cycles, counts[c])), axis=1).ravel()[:need]
        out[mine] = members[starts[c] + stream].reshape(-1, per_class)
    return out.ravel()[:n]


def shard_train(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's part of a training order: truncate to a multiple of world, then every world-th."""
    check_rank(rank, world)
    return order[: len(order) // world * world][rank::world]


def shard_eval(n: int, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous block of 0..n-1; the blocks of all ranks cover every sample exactly once."""
    check_rank(rank, world)
    return np.array_split(np.arange(n, dtype=np.int64), world)[rank]


def check_rank(rank: int, world: int) -> None:
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size={world})")
