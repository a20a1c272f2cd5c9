"""The AP computation on hand-made cases whose AP is worked out by hand."""
import numpy as np
import pytest

from edge.evaluate.widerface import WiderGT, bbox_overlaps, evaluate, voc_ap


def _gt(boxes, keep):
    gt = WiderGT(boxes={"e/img": np.asarray(boxes, float).reshape(-1, 4)})
    for s in ("easy", "medium", "hard"):
        gt.keep[s] = {"e/img": np.asarray(keep, np.int64)}
    return gt


GT2 = [[0, 0, 10, 10], [100, 100, 20, 20]]


def _pred(rows):
    return {"e/img": np.asarray(rows, float).reshape(-1, 5)}


def test_tp_fp_tp():
    # normalised scores 1, 0.5, 0: points (R .5, P 1), (R .5, P .5), (R 1, P 2/3)
    # AP = 0.5 * 1 + 0.5 * 2/3
    r = evaluate(_pred([[0, 0, 10, 10, 0.9], [50, 50, 10, 10, 0.8], [100, 100, 20, 20, 0.7]]), _gt(GT2, [0, 1]))
    assert r["hard"] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_ignored_face_is_neither_tp_nor_fp():
    # face 1 is not in the keep list: the detection on it does not count; one face, found first
    r = evaluate(_pred([[100, 100, 20, 20, 0.9], [0, 0, 10, 10, 0.8], [50, 50, 10, 10, 0.1]]), _gt(GT2, [0]))
    assert r["easy"] == pytest.approx(1.0)
    # same, but the false positive ranks above the face: P at recall 1 is 1/2
    r = evaluate(_pred([[100, 100, 20, 20, 0.9], [50, 50, 10, 10, 0.8], [0, 0, 10, 10, 0.1]]), _gt(GT2, [0]))
    assert r["easy"] == pytest.approx(0.5)


def test_ties_enter_together():
    # two detections with the same score, one on a face, one not: both enter at the same
    # threshold, so the curve never sees the tie's TP alone: P = 1/2 at R = 1/2; the second face
    # (score 0 after normalisation) comes last: P = 2/3 at R = 1. AP = .5 * 2/3 + .5 * 2/3
    r = evaluate(_pred([[50, 50, 10, 10, 0.8], [0, 0, 10, 10, 0.8], [100, 100, 20, 20, 0.2]]), _gt(GT2, [0, 1]))
    assert r["medium"] == pytest.approx(2 / 3)


def test_duplicate_detection_is_a_false_positive():
    # 2 detections on face 0; face 1 missed: R .5 at P 1 then P .5; AP = .5
    r = evaluate(_pred([[0, 0, 10, 10, 0.9], [1, 1, 10, 10, 0.5]]), _gt(GT2, [0, 1]))
    assert r["hard"] == pytest.approx(0.5)


def test_iou_threshold_with_plus_one_areas():
    # x, y, w, h (0,0,10,10) -> x2 = 10: 11 px wide with the kit's +1; shift by 4 px:
    # inter 7 x 11 = 77, union 121 + 121 - 77 = 165, IoU .467 < .5 -> a miss
    a = np.array([[0, 0, 10, 10]], float)
    b = np.array([[4, 0, 14, 10]], float)
    assert bbox_overlaps(a, b)[0, 0] == pytest.approx(77 / 165)
    r = evaluate(_pred([[4, 0, 10, 10, 0.9]]), _gt([[0, 0, 10, 10]], [0]))
    assert r["easy"] == 0.0
    r = evaluate(_pred([[3, 0, 10, 10, 0.9]]), _gt([[0, 0, 10, 10]], [0]))  # IoU 88/154 = .571
    assert r["easy"] == pytest.approx(1.0)


def test_faces_of_images_without_detections_count():
    gt = WiderGT(boxes={"e/a": np.array([[0, 0, 10, 10.0]]), "e/b": np.array([[0, 0, 10, 10.0]])})
    for s in ("easy", "medium", "hard"):
        gt.keep[s] = {"e/a": np.array([0]), "e/b": np.array([0])}
    r = evaluate({"e/a": np.array([[0, 0, 10, 10, 0.9]]), "e/b": np.zeros((0, 5))}, gt)
    assert r["easy"] == pytest.approx(0.5) and r["images"] == 2


def test_voc_ap_envelope():
    # precision 0.5 at recall .5 then 1.0 at recall 1: the envelope lifts the first half to 1
    assert voc_ap(np.array([0.5, 1.0]), np.array([0.5, 1.0])) == pytest.approx(1.0)
    assert voc_ap(np.array([0.5, 0.5]), np.array([1.0, 0.5])) == pytest.approx(0.5)
