"""Bounded fuzzing (hypothesis) of the two loaders that read untrusted files: images and bundle
metadata. Either the input is accepted and well-formed, or the loader raises its typed error;
nothing else may escape. FUZZ_EXAMPLES=5000 for a longer run."""
import io
import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edge.bundle import read_metadata
from edge.errors import BundleError, ImageError
from edge.image_io import load_image
from edge.samples import grace_hopper_path

N = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck), derandomize="FUZZ_EXAMPLES" not in os.environ)


def _seeds() -> dict[str, bytes]:
    img = Image.open(grace_hopper_path()).convert("RGB").resize((48, 56))
    out = {}
    for fmt, kw in (("JPEG", {"quality": 80}), ("PNG", {}), ("GIF", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {})):
        buf = io.BytesIO()
        (img.convert("P") if fmt == "GIF" else img).save(buf, fmt, **kw)
        out[fmt] = buf.getvalue()
    return out


SEEDS = _seeds()


@st.composite
def mutated(draw):
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite_header"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=64))
        else:
            j = draw(st.integers(0, min(32, len(data) - 1)))
            data[j] = draw(st.integers(0, 255))
    return bytes(data)


@FUZZ
@given(data=mutated())
def test_image_loader_never_escapes(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("fz") / "x.jpg"
    p.write_bytes(data)
    try:
        out = load_image(p)
    except ImageError as e:
        assert "\n" not in str(e)
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.size > 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def onnx_bundle(bundles):
    return bundles("onnx", "fp32")


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(["format_version", "target", "model_file", "files", "spec", "precision", "gates", "weights"]),
                                st.one_of(st.just("<delete>"), json_values)), min_size=1, max_size=4),
       spec_edit=st.one_of(st.none(), st.tuples(st.sampled_from(["arch", "mean", "steps", "variances", "input_size", "mesh_vertices"]), json_values)))
def test_bundle_loader_never_escapes(onnx_bundle, tmp_path_factory, edits, spec_edit):
    d = tmp_path_factory.mktemp("fb") / "b"
    shutil.copytree(onnx_bundle, d)
    meta = json.loads((d / "metadata.json").read_text())
    for key, value in edits:
        if value == "<delete>":
            meta.pop(key, None)
        else:
            meta[key] = value
    if spec_edit and isinstance(meta.get("spec"), dict):
        meta["spec"][spec_edit[0]] = spec_edit[1]
    (d / "metadata.json").write_text(json.dumps(meta))
    try:
        read_metadata(d)
    except BundleError as e:
        assert "\n" not in str(e)
