"""The long-tail maths of Yang & Xu (2020): per-class counts and seeded selection.

`n_max` is the head-class count. `convert` uses the smallest per-class count of the source's train split
(so every class can supply its quota) unless `--max-per-class` sets it lower.
"""
from __future__ import annotations

import numpy as np

from data_prep import ConvertError

PROFILES = ("exp", "step", "none")


def class_counts(num_classes: int, n_max: int, profile: str, rho: float) -> list[int]:
    """Images kept per class. exp: n_max * (1/rho)^(i/(C-1)); step: n_max for i < C//2, else n_max/rho."""
    if profile not in PROFILES:
        raise ConvertError(f"unknown long-tail profile {profile!r}; use one of {', '.join(PROFILES)}")
    if profile != "none" and rho < 1:
        raise ConvertError(f"imbalance ratio rho={rho} must be >= 1 (rho = n_max / n_min)")
    if profile == "none":
        return [int(n_max)] * num_classes
    if profile == "step":
        return [int(n_max) if i < num_classes // 2 else int(n_max / rho) for i in range(num_classes)]
    return [int(n) for n in exp_profile(num_classes, n_max, rho)]


def exp_profile(num_classes: int, n_max: float, rho: float) -> np.ndarray:
    """The exp profile before rounding, n_max * (1/rho)^(i/(C-1)) per class i (float64)."""
    i = np.arange(num_classes)
    return n_max * (1 / rho) ** (i / max(num_classes - 1, 1))


def unlabeled_counts(num_classes: int, total: int, rho_u: float) -> list[int]:
    """Unlabeled pool per class, as in the paper's code: an exp profile from total // C, rescaled to total."""
    first = total // num_classes
    span = max(num_classes - 1, 1)
    counts = [int(first * (1 / rho_u) ** (i / span)) for i in range(num_classes)]
    if sum(counts) == 0:
        return counts
    factor = total / sum(counts)
    return [int(c * factor) for c in counts]


def select(labels: np.ndarray, counts: list[int], seed, candidates: np.ndarray | None = None,
           allow_shortfall: bool = False) -> np.ndarray:
    """Seeded draw of `counts[c]` indices of each class c from `candidates` (default: all), sorted.

    `labels` is indexed by source index. With `allow_shortfall` a class with too few images gives all it
    has (the caller records the shortfall); otherwise that is a ConvertError.
    """
    labels = np.asarray(labels)
    pool = np.arange(len(labels)) if candidates is None else np.asarray(candidates, dtype=np.int64)
    pool_labels = labels[pool]
    order = np.argsort(pool_labels, kind="stable")  # pool grouped by class, original order within a class
    bounds = np.searchsorted(pool_labels[order], np.arange(len(counts) + 1))
    rng = np.random.default_rng(seed)
    chosen = []
    for c, want in enumerate(counts):
        have = pool[order[bounds[c]:bounds[c + 1]]]
        if len(have) < want and not allow_shortfall:
            raise ConvertError(f"class {c} has {len(have)} images but the long-tail profile asks for {want}; "
                               f"lower --max-per-class or --rho")
        chosen.append(rng.permutation(have)[:want])
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)
