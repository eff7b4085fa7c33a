"""Detection metrics (paper Table 5 protocol + AP with fake as the positive class)."""

import pytest
from sklearn.metrics import average_precision_score

from legion.eval.detection import detection_metrics


def rec(subset, is_fake, p):
    return {"subset": subset, "is_fake": is_fake, "fake_prob": p}


def test_per_subset_accuracy_unweighted_mean_and_class_accuracies():
    records = [
        # subset "a": 4 images, 3 correct
        rec("a", True, 0.9),
        rec("a", True, 0.2),
        rec("a", False, 0.1),
        rec("a", False, 0.3),
        # subset "b": 2 images, 2 correct
        rec("b", True, 0.7),
        rec("b", False, 0.4),
    ]
    m = detection_metrics(records)
    assert m["per_subset"]["a"]["accuracy"] == pytest.approx(75.0)
    assert m["per_subset"]["b"]["accuracy"] == pytest.approx(100.0)
    assert m["mean_accuracy"] == pytest.approx(87.5)  # unweighted, not 5/6
    assert m["overall"]["accuracy"] == pytest.approx(100 * 5 / 6)
    assert m["per_subset"]["a"]["fake_accuracy"] == pytest.approx(50.0)
    assert m["per_subset"]["a"]["real_accuracy"] == pytest.approx(100.0)
    assert m["per_subset"]["a"]["ap"] == pytest.approx(
        100 * average_precision_score([1, 1, 0, 0], [0.9, 0.2, 0.1, 0.3])
    )
    assert m["num_subsets"] == 2 and m["positive_class"] == "fake"


def test_tie_at_half_is_fake_like_reference_argmax():
    m = detection_metrics([rec("s", True, 0.5), rec("s", False, 0.5)])
    assert m["per_subset"]["s"]["fake_accuracy"] == 100.0 and m["per_subset"]["s"]["real_accuracy"] == 0.0


def test_ap_ranks_fake_as_positive():
    # perfect ranking but every prob < 0.5: accuracy 50, AP 100
    m = detection_metrics([rec("s", True, 0.4), rec("s", True, 0.3), rec("s", False, 0.2), rec("s", False, 0.1)])
    assert m["per_subset"]["s"]["accuracy"] == 50.0 and m["per_subset"]["s"]["ap"] == pytest.approx(100.0)
    # reversed scores: AP well below 100
    m2 = detection_metrics([rec("s", True, 0.1), rec("s", True, 0.2), rec("s", False, 0.3), rec("s", False, 0.4)])
    assert m2["per_subset"]["s"]["ap"] < 60


def test_single_class_subset_has_no_ap_and_groups_average_members():
    records = [
        rec("progan", True, 0.9),
        rec("progan", False, 0.1),
        rec("biggan", True, 0.9),
        rec("biggan", True, 0.1),
        rec("crn", False, 0.2),
    ]
    m = detection_metrics(records)
    assert m["per_subset"]["crn"]["ap"] is None and m["per_subset"]["crn"]["fake_accuracy"] is None
    assert m["groups"]["GANs"]["accuracy"] == pytest.approx((100 + 50) / 2)
    assert m["groups"]["GANs"]["subsets"] == ["progan", "biggan"]
    assert m["groups"]["CRN"]["accuracy"] == 100.0 and "Diffusion" not in m["groups"]
    assert m["per_subset"]["biggan"]["ap"] is None  # fakes only
    assert m["mean_ap"] == pytest.approx(m["per_subset"]["progan"]["ap"])  # mean over defined APs


def test_bad_records_raise():
    with pytest.raises(ValueError, match="missing field"):
        detection_metrics([{"subset": "a", "is_fake": True}])
    with pytest.raises(ValueError, match="bool"):
        detection_metrics([rec("a", 1, 0.3)])
    with pytest.raises(ValueError, match="probability"):
        detection_metrics([rec("a", True, 1.5)])
    with pytest.raises(ValueError, match="no records"):
        detection_metrics([])
