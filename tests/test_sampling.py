"""Epoch orders and rank sharding (fasttrain.data.sampling): pure numpy; one test reads them back through a
loader on the tiny dataset."""
import numpy as np
import pytest

from fasttrain.data.sampling import epoch_order, shard_eval, shard_train

LONG_TAIL = np.repeat([0, 1, 2, 3], [800, 150, 40, 10])
CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]      # int(5000 * 0.01^(i/9))


def frequencies(labels, sampler, epochs=20, **kwargs):
    drawn = np.concatenate([labels[epoch_order(labels, sampler, seed=0, epoch=e, **kwargs)] for e in range(epochs)])
    return np.bincount(drawn) / len(drawn)


def effective_number_frequencies(counts, beta):
    """The paper's ImbalancedDatasetSampler: sample weight (1 - beta) / (1 - beta^n_c), so class c is drawn
    with probability n_c (1 - beta) / (1 - beta^n_c), normalised."""
    n = np.asarray(counts, dtype=np.float64)
    p = n * (1 - beta) / (1 - beta ** n)
    return p / p.sum()


def test_resample_draws_classes_as_the_papers_effective_number_sampler():
    labels = np.repeat(np.arange(10), CIFAR10_LT_100)
    freq = frequencies(labels, "resample")                              # 20 epochs of 12,406 draws
    np.testing.assert_allclose(freq, effective_number_frequencies(CIFAR10_LT_100, 0.9999), rtol=0.02)
    assert freq[0] / freq[9] == pytest.approx(1.27, abs=0.02)           # largest / smallest class: 1.27x, not 1x
    order = epoch_order(labels, "resample", seed=0, epoch=0)
    assert order.dtype == np.int64 and len(order) == len(labels)
    assert len(np.unique(order)) < len(labels)                          # drawn with replacement


@pytest.mark.parametrize("beta", [0.999, 0.0])
def test_resample_takes_its_beta_from_cb_beta(beta):
    freq = frequencies(LONG_TAIL, "resample", cb_beta=beta)
    np.testing.assert_allclose(freq, effective_number_frequencies([800, 150, 40, 10], beta), atol=0.01)
    if beta == 0:                                                       # beta 0: the classes' own frequencies
        np.testing.assert_allclose(freq, [0.8, 0.15, 0.04, 0.01], atol=0.01)
    else:                                                               # 0.32, 0.24, 0.22, 0.22
        assert freq[0] > 0.3 and freq[3] < 0.23
    with pytest.raises(ValueError, match="cb_beta"):
        epoch_order(LONG_TAIL, "resample", 0, 0, cb_beta=1.0)


def test_resample_is_a_pure_function_of_seed_and_epoch_and_shards_like_every_sampler(tiny_raw):
    from fasttrain.data import augment, build_loader
    from fasttrain.dataset import DatasetDir
    order = epoch_order(LONG_TAIL, "resample", seed=1, epoch=2)
    assert np.array_equal(order, epoch_order(LONG_TAIL, "resample", seed=1, epoch=2))
    assert not np.array_equal(order, epoch_order(LONG_TAIL, "resample", seed=1, epoch=3))
    assert not np.array_equal(order, epoch_order(LONG_TAIL, "resample", seed=2, epoch=2))
    # through a loader: each rank reads its shard of the global resample order, with the loader's cb_beta
    dataset = DatasetDir(tiny_raw)
    labels = dataset.split("train").labels
    want = epoch_order(labels, "resample", seed=3, epoch=1, cb_beta=0.9)
    assert not np.array_equal(want, epoch_order(labels, "resample", seed=3, epoch=1))   # beta 0.9 matters here
    for rank in range(2):
        loader = build_loader(dataset, "train", kind="device", batch_size=5, views=[augment.small_train()],
                              train=True, sampler="resample", cb_beta=0.9, seed=3, rank=rank, world_size=2, workers=1)
        assert np.array_equal(loader.epoch_positions(1), shard_train(want, rank, 2))   # 45 each: 9 full batches


def test_uniform_is_a_permutation_and_a_pure_function_of_seed_and_epoch():
    order = epoch_order(LONG_TAIL, "uniform", seed=1, epoch=2)
    assert order.dtype == np.int64 and sorted(order) == list(range(len(LONG_TAIL)))
    assert np.array_equal(order, epoch_order(LONG_TAIL, "uniform", seed=1, epoch=2))
    assert not np.array_equal(order, epoch_order(LONG_TAIL, "uniform", seed=1, epoch=3))
    assert not np.array_equal(order, epoch_order(LONG_TAIL, "uniform", seed=2, epoch=2))


def test_balanced_draws_classes_uniformly():
    freq = frequencies(LONG_TAIL, "balanced")
    np.testing.assert_allclose(freq, 0.25, atol=0.01)
    order = epoch_order(LONG_TAIL, "balanced", seed=0, epoch=0)
    assert len(order) == len(LONG_TAIL)
    assert len(np.unique(order[LONG_TAIL[order] == 3])) == 10          # every sample of the rare class


def test_balanced_skips_classes_without_samples():
    labels = np.repeat([0, 2, 7], [50, 20, 5])                        # classes 1, 3..6 are empty
    freq = frequencies(labels, "balanced")
    np.testing.assert_allclose(freq[[0, 2, 7]], 1 / 3, atol=0.02)
    assert freq[[1, 3, 4, 5, 6]].sum() == 0


def test_sqrt_class_probability_follows_the_square_root_of_the_count():
    expected = np.sqrt([800, 150, 40, 10])
    np.testing.assert_allclose(frequencies(LONG_TAIL, "sqrt"), expected / expected.sum(), atol=0.01)


def test_instances_within_a_class_are_drawn_uniformly():
    drawn = np.concatenate([epoch_order(LONG_TAIL, "balanced", 0, e) for e in range(20)])
    counts = np.bincount(drawn[LONG_TAIL[drawn] == 2] - 950, minlength=40)   # class 2: positions 950..989
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()


@pytest.mark.parametrize("sampler", ["resample", "balanced", "sqrt"])
def test_negative_labels_need_sampling_labels(sampler):
    with pytest.raises(ValueError, match="sampling_labels"):
        epoch_order(np.array([0, 1, -1]), sampler, 0, 0)
    assert len(epoch_order(np.array([-1, -1, -1]), "uniform", 0, 0)) == 3


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler"):
        epoch_order(LONG_TAIL, "square", 0, 0)


def test_train_shards_are_disjoint_equal_and_cover_the_truncated_order():
    order = epoch_order(np.zeros(101, np.int64), "uniform", 0, 0)
    shards = [shard_train(order, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [33, 33, 33]
    assert sorted(np.concatenate(shards)) == sorted(order[:99])
    assert np.array_equal(shards[1], order[1:99:3])


def test_eval_shards_cover_every_sample_once_in_contiguous_blocks():
    for n, world in [(10, 3), (7, 2), (2, 4)]:
        shards = [shard_eval(n, r, world) for r in range(world)]
        assert np.array_equal(np.concatenate(shards), np.arange(n))


def test_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        shard_eval(10, 2, 2)
