"""Property tests (hypothesis) for anchors, the box/landmark codec, NMS and letterbox/rescale."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge.anchors import decode_boxes, decode_points, encode_boxes, encode_points, priors
from edge.contract import ARCHS, ModelSpec
from edge.postprocess import Detections, box_iou, nms, rescale
from edge.preprocess import prepare

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
sides = st.integers(1, 40).map(lambda k: 32 * k)


@SETTINGS
@given(h=sides, w=sides, arch=st.sampled_from(sorted(ARCHS)))
def test_priors(h, w, arch):
    spec = ModelSpec(arch=ARCHS[arch])
    h, w = -(-h // spec.pad_multiple) * spec.pad_multiple, -(-w // spec.pad_multiple) * spec.pad_multiple
    p = priors(h, w, spec.arch.min_sizes, spec.steps)
    assert p.shape == (spec.num_anchors(h, w), 4) and p.dtype == np.float32
    assert (p[:, :2] > 0).all() and (p[:, :2] < 1).all() and (p[:, 2:] > 0).all()
    # first anchor of each level sits half a stride from the corner
    half = spec.steps[0] / 2
    assert np.isclose(p[0, 0], half / w) and np.isclose(p[0, 1], half / h)


@st.composite
def boxes_and_priors(draw):
    n = draw(st.integers(1, 30))
    pri = np.stack([draw(arrays(np.float64, n, elements=st.floats(0.05, 0.95))), draw(arrays(np.float64, n, elements=st.floats(0.05, 0.95))),
                    draw(arrays(np.float64, n, elements=st.floats(0.01, 0.8))), draw(arrays(np.float64, n, elements=st.floats(0.01, 0.8)))], 1)
    c = draw(arrays(np.float64, (n, 2), elements=st.floats(0.0, 1.0)))
    s = draw(arrays(np.float64, (n, 2), elements=st.floats(0.005, 1.0)))
    pts = draw(arrays(np.float64, (n, 5, 2), elements=st.floats(-0.2, 1.2)))
    return pri.astype(np.float32), np.concatenate([c - s / 2, c + s / 2], 1).astype(np.float32), pts.astype(np.float32)


@SETTINGS
@given(boxes_and_priors())
def test_encode_decode_round_trip(data):
    pri, boxes, pts = data
    np.testing.assert_allclose(decode_boxes(encode_boxes(boxes, pri), pri), boxes, atol=2e-5)
    np.testing.assert_allclose(decode_points(encode_points(pts, pri), pri), pts, atol=2e-5)


@st.composite
def scored_boxes(draw, ties=False):
    n = draw(st.integers(0, 40))
    xy = draw(arrays(np.float64, (n, 2), elements=st.floats(0, 100)))
    wh = draw(arrays(np.float64, (n, 2), elements=st.floats(1, 40)))
    if ties:
        scores = draw(arrays(np.float64, n, elements=st.sampled_from([0.3, 0.5, 0.9])))
    else:
        scores = draw(arrays(np.int64, n, elements=st.integers(0, 10**6), unique=True)) / 1e6  # distinct also in float32
    return np.concatenate([xy, xy + wh], 1).astype(np.float32), scores.astype(np.float32)


def _valid_nms(boxes, scores, keep, thr):
    """The characterisation of greedy NMS: kept boxes never overlap each other above thr, and
    every dropped box overlaps a kept box of at least its score above thr."""
    kept = boxes[keep]
    if len(keep) > 1:
        iou = box_iou(kept, kept)
        np.fill_diagonal(iou, 0)
        assert (iou <= thr).all()
    dropped = np.setdiff1d(np.arange(len(boxes)), keep)
    if len(dropped):
        iou = box_iou(boxes[dropped], kept) if len(keep) else np.zeros((len(dropped), 0))
        ok = (iou > thr) & (scores[keep][None, :] >= scores[dropped][:, None])
        assert ok.any(axis=1).all()


@SETTINGS
@given(scored_boxes(), st.floats(0.1, 0.9), st.randoms(use_true_random=False))
def test_nms_invariants(data, thr, rnd):
    boxes, scores = data
    keep = nms(boxes, scores, thr)
    assert len(set(keep.tolist())) == len(keep) and set(keep.tolist()) <= set(range(len(boxes)))  # subset of the input
    assert (np.diff(scores[keep]) <= 0).all()
    _valid_nms(boxes, scores, keep, thr)
    again = nms(boxes[keep], scores[keep], thr)  # idempotent
    assert again.tolist() == list(range(len(keep)))
    perm = np.array(rnd.sample(range(len(boxes)), len(boxes)), dtype=np.int64)
    keep_p = nms(boxes[perm], scores[perm], thr)  # distinct scores: input order does not matter
    assert sorted(perm[keep_p].tolist()) == sorted(keep.tolist())


@SETTINGS
@given(scored_boxes(ties=True), st.floats(0.1, 0.9), st.randoms(use_true_random=False))
def test_nms_with_ties_stays_valid_in_any_order(data, thr, rnd):
    boxes, scores = data
    perm = np.array(rnd.sample(range(len(boxes)), len(boxes)), dtype=np.int64)
    for b, s in ((boxes, scores), (boxes[perm], scores[perm])):
        _valid_nms(b, s, nms(b, s, thr), thr)


@SETTINGS
@given(h=st.integers(1, 900), w=st.integers(1, 900), size=st.sampled_from([None, 320, 640]),
       box=arrays(np.float64, 4, elements=st.floats(0, 1)))
def test_letterbox_rescale_round_trip(h, w, size, box):
    prep = prepare(np.zeros((h, w, 3), np.uint8), ModelSpec(input_size=size))
    ih, iw = prep.input_hw
    assert ih % 32 == 0 and iw % 32 == 0 and ih >= min(h * prep.scale, ih) and (size is None or (ih, iw) == (size, size))
    x1, x2 = sorted(box[[0, 2]] * w)
    y1, y2 = sorted(box[[1, 3]] * h)
    orig = np.array([[x1, y1, x2, y2]], np.float32)
    det = Detections(orig * prep.scale, np.ones(1, np.float32), np.zeros((1, 5, 2), np.float32))
    back = rescale(det, prep.scale, prep.pad, prep.image_hw)
    np.testing.assert_allclose(back.boxes, orig, rtol=1e-5, atol=1e-3)
