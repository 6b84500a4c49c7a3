"""Metrics against hand-computed class-wise mIoU and FB-IoU (ignore 255, unseen classes)."""
import pytest
import torch

from util.metrics import (FewShotMeter, SegmentationMeter, crop_targets, intersection_union,
                          predict_at_original_resolution)

T = torch.tensor


def test_intersection_union_ignores_255():
    inter, union = intersection_union(T([[1, 1], [0, 0]]), T([[1, 0], [1, 255]]), 2)
    assert inter.tolist() == [0, 1] and union.tolist() == [2, 3]


def test_few_shot_meter_hand_computed():
    meter = FewShotMeter([1, 2, 3])
    # episode A (class 1): fg I=1 U=3, bg I=0 U=2 ; episode B (class 1): fg I=2 U=4, bg I=0 U=2
    meter.update(torch.stack([T([[1, 1], [0, 0]]), T([[1, 1], [1, 1]])]),
                 torch.stack([T([[1, 0], [1, 255]]), T([[1, 1], [0, 0]])]), T([1, 1]))
    # episode C (class 2): fg I=1 U=1, bg I=3 U=3 (a list of maps is accepted)
    meter.update([T([[0, 0], [0, 1]])], [T([[0, 0], [0, 1]])], [2])
    s = meter.summary()
    assert s["class_iou"][1] == pytest.approx(3 / 7)
    assert s["class_iou"][2] == pytest.approx(1.0)
    assert s["class_iou"][3] == 0.0 and s["classes_unseen"] == [3]
    assert s["miou"] == pytest.approx((3 / 7 + 1 + 0) / 3)          # unseen counts as 0, as the original
    assert s["fbiou"] == pytest.approx((3 / 7 + 4 / 8) / 2)
    assert s["episodes"] == 3


def test_class_wise_accumulation_is_not_a_mean_of_episodes():
    meter = FewShotMeter([1])
    meter.update([T([1, 0, 0, 0])], [T([1, 1, 1, 1])], [1])   # IoU 1/4
    meter.update([T([1, 1])], [T([1, 1])], [1])               # IoU 1
    assert meter.summary()["miou"] == pytest.approx(3 / 6)    # (1+2)/(4+2), not (0.25+1)/2


def test_meter_rejects_bad_input():
    meter = FewShotMeter([1, 2])
    with pytest.raises(ValueError, match="not one of the meter's classes"):
        meter.update([T([1])], [T([1])], [5])
    with pytest.raises(ValueError, match="differ in shape"):
        meter.update([T([1, 0])], [T([1])], [1])


def test_segmentation_meter_excludes_background():
    meter = SegmentationMeter(3)
    meter.update(T([[[0, 1], [2, 2]]]), T([[[0, 1], [1, 255]]]))
    s = meter.summary()
    assert s["class_iou"][0] == pytest.approx(1.0) and s["class_iou"][1] == pytest.approx(0.5)
    assert s["class_iou"][2] == 0.0
    assert s["miou"] == pytest.approx(0.25)


def test_original_resolution_prediction_per_sample():
    logits = torch.zeros(2, 2, 5, 5)
    logits[0, 1, :, :2] = 1.0     # sample 0: foreground on the left
    logits[1, 1, :2] = 1.0        # sample 1: foreground at the top
    sizes = T([[3, 7], [9, 4]])
    preds = predict_at_original_resolution(logits, sizes)
    assert preds[0].shape == (7, 7) and preds[1].shape == (9, 9)
    assert preds[0][:, 0].all() and not preds[0][:, -1].any()
    assert preds[1][0].all() and not preds[1][-1].any()
    labels = torch.full((2, 9, 9), 255)
    assert [t.shape for t in crop_targets(labels, sizes)] == [(7, 7), (9, 9)]
