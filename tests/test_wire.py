"""The wire formats of features between tiers: fp32 exact, fp16 and int8 within their error bounds, bad payloads refused."""
import json
import struct

import numpy as np
import pytest

from exitwise.deploy.wire import FORMATS, MAGIC, decode, encode
from exitwise.errors import UserError


def _features(seed=0, shape=(5, 4, 3, 3)):
    g = np.random.default_rng(seed)
    x = g.normal(size=shape).astype(np.float32) * np.array([0.01, 1, 30, 0], dtype=np.float32)[None, :, None, None]
    return x  # channels of very different ranges, one all zero


def test_fp32_round_trip_is_exact():
    x = _features()
    y = decode(encode(x, "fp32"))
    assert y.dtype == np.float32 and y.shape == x.shape and np.array_equal(x, y)


def test_fp16_error_is_half_a_unit_in_the_last_place():
    x = _features()
    y = decode(encode(x, "fp16"))
    assert np.all(np.abs(y - x) <= np.abs(x) * 2.0 ** -11 + 2.0 ** -25)  # fp16: 11 significant bits; subnormals


def test_int8_error_is_at_most_half_a_step_of_its_channel():
    x = _features()
    y = decode(encode(x, "int8"))
    step = np.abs(x).max(axis=(0, 2, 3)) / 127
    assert np.all(np.abs(y - x) <= step[None, :, None, None] * 0.5 * (1 + 1e-5) + 1e-12)
    assert np.all(y[:, 3] == 0)  # an all-zero channel stays zero (scale 0)


def test_int8_on_vectors_and_payload_sizes():
    x = np.random.default_rng(1).normal(size=(6, 10)).astype(np.float32)
    assert decode(encode(x, "int8")).shape == (6, 10)
    sizes = {fmt: len(encode(x, fmt)) for fmt in FORMATS}
    assert sizes["fp32"] > sizes["fp16"] > 60  # header is small: 6 * 10 values dominate
    assert len(encode(np.zeros((64, 32, 32, 32), np.float32), "int8")) < 64 * 32 * 32 * 32 * 1.01


def test_int8_scales_travel_as_float32_and_scales_sent_as_json_numbers_still_decode():
    x = np.random.default_rng(2).normal(size=(3, 192, 8, 8)).astype(np.float32)
    payload = encode(x, "int8")
    assert len(payload) - x.size < 192 * 4 + 80  # 4 bytes a scale and a short header (JSON numbers took about 21)
    head_length = struct.unpack("<I", payload[4:8])[0]
    header = json.loads(payload[8:8 + head_length])
    scales = np.frombuffer(payload[8 + head_length:][:192 * 4], "<f4")
    as_json = _with_header({**header, "scales": scales.tolist()}, payload[8 + head_length + 192 * 4:])
    np.testing.assert_array_equal(decode(as_json), decode(payload))


@pytest.mark.parametrize("payload,why", [
    (b"", "does not start"),
    (b"NOPE" + b"\0" * 20, "does not start"),
    (MAGIC + struct.pack("<I", 1000) + b"{}", "does not fit"),
    (MAGIC + struct.pack("<I", 3) + b"abc", "not JSON"),
    (MAGIC + struct.pack("<I", 10000) + b"[" * 5000 + b"]" * 5000, "not JSON"),  # nested past Python's recursion
    (MAGIC + struct.pack("<I", 17) + b'{"format":"fp64"}', "unknown format"),
])
def test_malformed_payloads_are_refused(payload, why):
    with pytest.raises(UserError, match=why):
        decode(payload)


def _with_header(header: dict, body: bytes) -> bytes:
    head = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + body


def test_payloads_that_lie_about_their_content_are_refused():
    good = encode(np.ones((2, 3), np.float32), "fp32")
    with pytest.raises(UserError, match="bytes of values"):
        decode(good[:-1])
    with pytest.raises(UserError, match="shape"):
        decode(_with_header({"format": "fp32", "shape": [2, -3]}, b""))
    with pytest.raises(UserError, match="scales"):
        decode(_with_header({"format": "int8", "shape": [1, 2], "scales": [1.0]}, b"\1\1"))
    with pytest.raises(UserError, match="scales"):  # float32 scales before the values: one negative, one NaN
        decode(_with_header({"format": "int8", "shape": [1, 2], "scales": "float32"},
                            np.array([-1, np.nan], "<f4").tobytes() + b"\1\1"))
    with pytest.raises(UserError, match="bytes of values"):  # the scales missing
        decode(_with_header({"format": "int8", "shape": [1, 2], "scales": "float32"}, b"\1\1"))
    with pytest.raises(UserError, match="NaN"):
        decode(_with_header({"format": "fp32", "shape": [1]}, np.array([np.nan], "<f4").tobytes()))
    with pytest.raises(UserError, match="NaN"):
        encode(np.array([[np.inf]], np.float32), "fp16")
    with pytest.raises(UserError, match="beyond fp16's range"):  # finite in float32, inf as fp16: was sent, refused
        encode(np.array([[1.0, 70000.0]], np.float32), "fp16")
    assert decode(encode(np.array([[65504.0]], np.float32), "fp16"))[0, 0] == 65504.0  # fp16's largest: sent
    with pytest.raises(UserError, match="unknown wire format"):
        encode(np.ones((1, 1)), "bf16")


def test_images_cross_exactly_as_uint8():
    from exitwise.deploy.wire import IMAGE
    pixels = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    got = decode(encode(pixels, IMAGE))
    assert got.dtype == np.uint8 and np.array_equal(got, pixels)
    with pytest.raises(UserError, match="uint8 images"):
        encode(pixels.astype(np.float32), IMAGE)


def test_shapes_and_scales_past_what_numpy_or_float32_hold_are_refused_not_raised():
    """These raised OverflowError, ValueError or TypeError (a 500 at the tier), or decoded to infinities."""
    for shape in ([2**62, 4], [2**32, 2**32], [10**30, 16]):  # int64 wraps to 0 bytes, or does not hold the size
        with pytest.raises(UserError, match="bytes of values"):
            decode(_with_header({"format": "fp32", "shape": shape}, b""))
    with pytest.raises(UserError, match="shape"):  # more axes than numpy holds
        decode(_with_header({"format": "fp32", "shape": [1] * 70}, b"\0" * 4))
    for scales in ([10**400] * 2, [1e300] * 2, [True, 1]):  # no float32; a boolean is no scale
        with pytest.raises(UserError, match="scales"):
            decode(_with_header({"format": "int8", "shape": [1, 2], "scales": scales}, b"\1\1"))
    with pytest.raises(UserError, match="overflow"):  # float32 scales, but times 127 they are not
        decode(_with_header({"format": "int8", "shape": [1, 2], "scales": "float32"},
                            np.array([3e38, 1], "<f4").tobytes() + b"\x7f\x7f"))
