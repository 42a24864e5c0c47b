import numpy as np

from fasttrain.evaluate import summarize


def test_summarize_groups_and_accuracies():
    # 3 classes with 150 / 50 / 5 training images -> many / medium / few
    confusion = np.array([[8, 2, 0], [1, 4, 5], [0, 0, 10]])
    top5 = np.array([10, 10, 10])
    m = summarize(confusion, top5, [150, 50, 5])
    assert m["top1"] == 100 * 22 / 30 and m["top5"] == 100
    assert m["many"] == 80 and m["medium"] == 40 and m["few"] == 100
    assert m["per_class"] == [80, 40, 100] and m["group_sizes"] == {"many": 1, "medium": 1, "few": 1}


def test_empty_group_is_none_and_thresholds_configurable():
    confusion = np.eye(2, dtype=int) * 5
    m = summarize(confusion, np.array([5, 5]), [30, 40])
    assert m["many"] is None and m["few"] is None and m["medium"] == 100
    m = summarize(confusion, np.array([5, 5]), [30, 40], many=35, few=31)
    assert m["many"] == 100 and m["few"] == 100 and m["medium"] is None
