import numpy as np
import pytest

from edge.anchors import decode_boxes, decode_points, encode_boxes, encode_points, priors
from edge.contract import FACE_DETECTOR_1MB, PYTORCH_RETINAFACE, ModelSpec
from edge.model import RetinaFace
from edge.pipeline import Pipeline, PostConfig
from edge.postprocess import Detections, QuantizedOutputs, box_iou, decode_detections, nms, rescale
from edge.preprocess import prepare, resize_bilinear, resize_numpy
from edge.runners import TorchRunner
from edge.weights.load import read_state_dict

from . import torch_reference as ref


@pytest.mark.parametrize("arch", [PYTORCH_RETINAFACE, FACE_DETECTOR_1MB])
@pytest.mark.parametrize("hw", [(640, 640), (928, 1600), (96, 64)])
def test_priors_match_reference_loop(arch, hw):
    ours = priors(*hw, arch.min_sizes, (8, 16, 32))
    np.testing.assert_allclose(ours, ref.prior_box(arch.min_sizes, (8, 16, 32), hw).numpy(), atol=1e-7)


@pytest.mark.parametrize("size", [640, None])
def test_decode_and_nms_agree_with_torch_reference(default_model, group_image, size):
    """Same kept set and coordinates within 1e-4 on real outputs, at low and normal thresholds."""
    model, _ = default_model
    for score in (0.02, 0.5):
        pipe = Pipeline(TorchRunner(model), model.spec.with_input_size(size), PostConfig(score_threshold=score, nms_threshold=0.4))
        prep = pipe.preprocess(group_image)
        raw = pipe.runner(prep.tensor)
        one = {k: v[0] for k, v in raw.items()}

        ours = decode_detections(one, pipe.priors_for(prep.input_hw), prep.input_hw, score_threshold=score, nms_threshold=0.4,
                                 mesh_decoder=pipe.mesh_decoder)
        rb, rs, rl = ref.detect(one, model.spec.arch.min_sizes, model.spec.steps, model.spec.variances, prep.input_hw, score, 0.4)
        assert len(ours) == len(rb) > 50
        np.testing.assert_array_equal(ours.scores, rs)
        # 1e-4 px, widened by 2 float32 ulps: above 1024 px one ulp is already 1.2e-4
        np.testing.assert_allclose(ours.boxes, rb, atol=1e-4, rtol=2.5e-7)
        np.testing.assert_allclose(ours.landmarks, rl, atol=1e-4, rtol=2.5e-7)
        assert ours.mesh.shape == (len(rb), 468, 3)


def test_group_counts_against_independent_measurements(default_model, shared_model, group_image):
    """group.jpg, score >= 0.5, NMS 0.4: default 392 native / 83 at 640, shared checkpoint 199 at 640 (within 5 %)."""
    counts = {}
    for key, (model, _), size in (("default_native", default_model, None), ("default_640", default_model, 640), ("shared_640", shared_model, 640)):
        counts[key] = len(Pipeline(TorchRunner(model), model.spec.with_input_size(size))(group_image))
    expected = {"default_native": 392, "default_640": 83, "shared_640": 199}
    for k, v in expected.items():
        assert abs(counts[k] - v) <= 0.05 * v, counts


def test_wrong_configuration_scores_near_zero(shared, shared_model, group_image):
    """The shared checkpoint run with Pytorch_Retinaface's configuration misplaces most faces:
    few of its boxes overlap the right configuration's faces at IoU >= 0.5."""

    wrong = RetinaFace(ModelSpec(arch=PYTORCH_RETINAFACE))
    wrong.load_state_dict(read_state_dict(shared / "weights" / "mobilenet0.25_Final.pth"))
    bad = Pipeline(TorchRunner(wrong.eval()), wrong.spec)(group_image)
    good = Pipeline(TorchRunner(shared_model[0]), shared_model[0].spec)(group_image)
    found = (box_iou(good.boxes, bad.boxes).max(axis=1) >= 0.5).mean()
    assert found < 0.2, found


def test_codec_round_trip():
    rng = np.random.default_rng(0)
    pri = priors(64, 96, ((16, 32), (64, 128), (256, 512)), (8, 16, 32))
    c = rng.uniform(0, 1, (len(pri), 2))
    s = rng.uniform(0.05, 0.5, (len(pri), 2))
    boxes = np.concatenate([c - s / 2, c + s / 2], 1).astype(np.float32)
    np.testing.assert_allclose(decode_boxes(encode_boxes(boxes, pri), pri), boxes, atol=1e-5)
    pts = rng.uniform(0, 1, (len(pri), 5, 2)).astype(np.float32)
    np.testing.assert_allclose(decode_points(encode_points(pts, pri), pri), pts, atol=1e-5)


def test_nms_basic_cases():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.9], np.float32)
    # tie between 0 and 3 (identical boxes): lower index wins, 3 and 1 suppressed
    assert nms(boxes, scores, 0.4).tolist() == [0, 2]
    assert nms(boxes, scores, 0.99).tolist() == [0, 1, 2]  # identical box 3: IoU 1 > 0.99
    assert nms(boxes, scores, 1.0).tolist() == [0, 3, 1, 2]
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.4).tolist() == []
    iou = box_iou(boxes[:1], boxes[1:2])[0, 0]
    assert iou == pytest.approx(81 / 119)


def test_letterbox_and_rescale_round_trip():
    img = np.zeros((300, 500, 3), np.uint8)
    prep = prepare(img, ModelSpec(input_size=640))
    assert prep.tensor.shape == (1, 3, 640, 640) and prep.scale == pytest.approx(640 / 500)
    # padding holds the mean colour: zeros after normalisation
    assert np.all(prep.tensor[0, :, 400:, :] == 0)
    box = np.array([[100, 50, 200, 150]], np.float32)
    det = Detections(box * prep.scale, np.ones(1, np.float32), np.zeros((1, 5, 2), np.float32))
    np.testing.assert_allclose(rescale(det, prep.scale, prep.pad, prep.image_hw).boxes, box, atol=1e-4)
    native = prepare(img, ModelSpec(input_size=None))
    assert native.tensor.shape == (1, 3, 320, 512) and native.scale == 1.0


def test_canvas_and_tensor_are_the_same_input():
    """Prepared's two views: the uint8 canvas (mean colour in the pad) normalised by hand is the tensor, exactly;
    no canvas where the image was resized; both views built lazily (a runner's own pre-processing skips the float tensor)."""

    rng = np.random.default_rng(0)
    spec = ModelSpec(input_size=640)
    for hw in [(640, 640), (300, 640), (640, 416)]:
        img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        prep = prepare(img, spec)
        assert prep._tensor is None and prep.has_canvas and prep.input_hw == (640, 640)
        canvas = prep.canvas
        assert canvas.shape == (640, 640, 3) and canvas.dtype == np.uint8
        np.testing.assert_array_equal(canvas[: hw[0], : hw[1]], img)
        by_hand = (canvas.astype(np.float32) - np.array(spec.mean, np.float32)).transpose(2, 0, 1)[None]
        np.testing.assert_array_equal(prep.tensor, by_hand)
    full = rng.integers(0, 256, (640, 640, 3), dtype=np.uint8)
    assert np.shares_memory(prepare(full, spec).canvas, full)  # nothing to pad: the image itself
    resized = prepare(rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8), spec)
    assert not resized.has_canvas and resized.tensor.shape == (1, 3, 640, 640)
    with pytest.raises(ValueError, match="no exact uint8 canvas"):
        resized.canvas
    pixels = resized.pixel_canvas  # the rounded canvas is built once: pre-processing builds it, inference reads it
    assert pixels is resized.pixel_canvas and pixels.dtype == np.uint8 and pixels.shape == (640, 640, 3)


def test_resize_matches_half_pixel_bilinear():
    img = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    out = resize_bilinear(img, 2, 2)[..., 0]
    # half-pixel centres: output (0, 0) samples source (0.5, 0.5)
    np.testing.assert_allclose(out, [[2.5, 4.5], [10.5, 12.5]])
    up = resize_bilinear(np.array([[0.0, 10.0]], np.float32)[..., None], 1, 4)[0, :, 0]
    np.testing.assert_allclose(up, [0.0, 2.5, 7.5, 10.0])
    for resize in (resize_bilinear, resize_numpy):  # the OpenCV fast path (where installed) and numpy agree
        np.testing.assert_allclose(resize(img, 2, 2)[..., 0], [[2.5, 4.5], [10.5, 12.5]])


def test_opencv_and_numpy_resize_agree():
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w, oh, ow = (int(v) for v in rng.integers(1, 200, 4))
        img = rng.integers(0, 256, (h, w, int(rng.choice([1, 3]))), dtype=np.uint8)
        a, b = resize_bilinear(img, oh, ow), resize_numpy(img, oh, ow)
        assert a.shape == b.shape == (oh, ow, img.shape[2]) and a.dtype == b.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=1e-3)


def test_image_without_faces_gives_empty_detections(default_model):
    model, _ = default_model
    for size in (640, None):
        det = Pipeline(TorchRunner(model), model.spec.with_input_size(size))(np.full((200, 300, 3), 127, np.uint8))
        assert len(det) == 0 and det.boxes.shape == (0, 4) and det.landmarks.shape == (0, 5, 2)


def test_quantized_outputs_decode_as_dequantised_whole(default_model, group_image):
    """Decoding int8 outputs dequantises only the rows it reads, and gives exactly the faces the whole dequantised
    outputs give; nothing but the face scores is read whole on the way."""
    model, _ = default_model
    pipe = Pipeline(TorchRunner(model), model.spec, PostConfig(score_threshold=0.3))
    prep = pipe.preprocess(group_image)
    out = pipe.runner(prep.tensor)
    raw, quantization = {}, {}
    for k, v in out.items():  # int8 as a full-integer model writes them; conf as a softmax: scale 1/256, zero point -128
        scale, zp = (1 / 256, -128) if k == "conf" else (float(np.abs(v).max()) / 127, 0)
        raw[k] = np.clip(np.round(v / scale) + zp, -128, 127).astype(np.int8)
        quantization[k] = (scale, zp)
    lazy = QuantizedOutputs(raw, quantization)
    whole = {k: (raw[k].astype(np.float32) - zp) * scale for k, (scale, zp) in quantization.items()}
    a, b = pipe.postprocess(lazy, prep), pipe.postprocess(whole, prep)
    assert len(a) > 50
    for f in ("boxes", "scores", "landmarks", "mesh", "anchors"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    one = lazy.batch(0)  # one image's outputs, still quantised: what decoding reads
    assert "mesh" in one and "loc2" not in one and one.raw["mesh"].dtype == np.int8
    faces = decode_detections(one, pipe.priors_for(prep.input_hw), prep.input_hw, score_threshold=0.3,
                              mesh_decoder=pipe.mesh_decoder)
    assert len(faces) == len(a) and one.dequantized == ()  # scores read as one column, the rest at the kept anchors
    np.testing.assert_array_equal(one.take("landmarks", np.array([3, 1])), whole["landmarks"][0, [3, 1]])
    np.testing.assert_array_equal(lazy["loc"], whole["loc"])  # read whole on demand (parity does), then cached
    assert lazy.dequantized == ("loc",) and lazy["loc"] is lazy["loc"]
    assert sorted(lazy) == sorted(out) and dict(lazy).keys() == out.keys()
