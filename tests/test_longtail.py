"""The long-tail maths: class counts (paper sizes), unlabeled pool counts, seeded selection."""
import numpy as np
import pytest

from data_prep import ConvertError
from data_prep.longtail import class_counts, select, unlabeled_counts


@pytest.mark.parametrize("c,n_max,totals", [(10, 5000, {100: 12406, 50: 13996, 10: 20431}),
                                             (100, 500, {100: 10847, 50: 12608, 10: 19573})])
def test_paper_cifar_lt_sizes(c, n_max, totals):
    for rho, total in totals.items():
        counts = class_counts(c, n_max, "exp", rho)
        assert sum(counts) == total
        assert counts[0] == n_max and counts[-1] == int(n_max / rho)


@pytest.mark.parametrize("rho", [1, 10, 100])
def test_profiles_match_formulas(rho):
    c, n_max = 10, 1000
    assert class_counts(c, n_max, "exp", rho) == [int(n_max * (1 / rho) ** (i / (c - 1))) for i in range(c)]
    assert class_counts(c, n_max, "step", rho) == [n_max] * 5 + [int(n_max / rho)] * 5
    assert class_counts(7, n_max, "step", rho) == [n_max] * 3 + [int(n_max / rho)] * 4
    assert class_counts(c, n_max, "none", rho) == [n_max] * c
    assert class_counts(1, n_max, "exp", rho) == [n_max]


def test_bad_profile_and_rho():
    with pytest.raises(ConvertError, match="unknown long-tail profile 'log'"):
        class_counts(10, 100, "log", 10)
    with pytest.raises(ConvertError, match="rho"):
        class_counts(10, 100, "exp", 0.5)


def test_unlabeled_counts_follow_paper_code():
    total, c, rho_u = 5 * 12406, 10, 100
    first = total // c
    raw = [int(first * (1 / rho_u) ** (i / (c - 1))) for i in range(c)]
    expected = [int(u * total / sum(raw)) for u in raw]
    assert unlabeled_counts(c, total, rho_u) == expected
    assert total - c <= sum(expected) <= total
    assert unlabeled_counts(4, 400, 1) == [100] * 4


def test_select_seeded_exact_counts():
    labels = np.repeat(np.arange(5), 50)
    counts = class_counts(5, 40, "exp", 10)
    a, b, other = select(labels, counts, 0), select(labels, counts, 0), select(labels, counts, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, other)
    assert np.bincount(labels[a], minlength=5).tolist() == counts
    assert np.all(np.diff(a) > 0)


def test_select_candidates_and_shortfall():
    labels = np.repeat(np.arange(3), 10)
    taken = select(labels, [5, 5, 5], 0)
    rest = np.setdiff1d(np.arange(30), taken)
    pool = select(labels, [8, 2, 5], 3, candidates=rest, allow_shortfall=True)
    assert not set(pool) & set(taken)
    assert np.bincount(labels[pool], minlength=3).tolist() == [5, 2, 5]
    with pytest.raises(ConvertError, match="class 0 has 5 images but the long-tail profile asks for 8"):
        select(labels, [8, 2, 5], 3, candidates=rest)
