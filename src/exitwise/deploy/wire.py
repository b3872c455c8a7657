"""Wire formats for the features that cross a cut between tiers: fp32, fp16, int8 (per-channel scales).

A payload is self-describing: the magic `EXW1`, a 4-byte little-endian header length, a JSON header
{"format", "shape", "scales"?} and the raw little-endian values. int8 is symmetric with one scale per
channel (axis 1: NCHW features or (N, D) vectors), each the batch's largest |value| in that channel / 127,
so a value's error is at most half its channel's scale; the scales go before the values as float32
(`"scales": "float32"` in the header; a list of JSON numbers there, as sent before, still decodes). fp32 is
exact. numpy only (no torch).
"""
from __future__ import annotations

import json
import math
import struct

import numpy as np

from ..config import WIRE_FORMATS as FORMATS  # from the largest payload to the smallest
from ..errors import UserError

MAGIC = b"EXW1"
IMAGE = "uint8"   # the original images (uint8 pixels), when a cut sends them instead of features: exact
BYTES_PER_VALUE = {"fp32": 4, "fp16": 2, "int8": 1, IMAGE: 1}
MAX_HEADER = 1 << 16                  # bytes; a longer header is refused as malformed
MAX_DIMS = 32                         # axes of a shape at most (numpy's own limit is 32 or 64, by version)
SCALES = "float32"                    # int8's header says its scales come first in the body, one float32 a channel
SCALE_DTYPE = np.dtype("<f4")         # ... in this dtype (`plan` counts their bytes with it)
FLOAT32_MAX = float(np.finfo(np.float32).max)  # an int8 scale above it is not a float32 (a JSON one may be)
_DTYPE = {"fp32": "<f4", "fp16": "<f2", "int8": "i1", IMAGE: "u1"}


def payload_bytes(shape: tuple[int, ...], fmt: str) -> int:
    """Bytes of the values of one payload (without the header and the int8 scales); in Python's integers, so a
    shape whose product overflows int64 (a malformed header's) is not taken for a small one."""
    return math.prod(shape) * BYTES_PER_VALUE[fmt]


def encode(features: np.ndarray, fmt: str) -> bytes:
    """`features` (float, at least 1-D, finite) as one payload in format `fmt` (or uint8 images as `IMAGE`)."""
    if fmt == IMAGE:
        if features.dtype != np.uint8:
            raise UserError(f"wire format {IMAGE} carries uint8 images, got {features.dtype}")
        head = json.dumps({"format": fmt, "shape": list(features.shape)}, separators=(",", ":")).encode()
        return MAGIC + struct.pack("<I", len(head)) + head + np.ascontiguousarray(features).tobytes()
    if fmt not in FORMATS:
        raise UserError(f"unknown wire format {fmt!r}; choose one of {', '.join(FORMATS)}")
    x = np.asarray(features, dtype=np.float32)
    if x.ndim < 1 or (fmt == "int8" and x.ndim < 2):
        raise UserError(f"wire format {fmt}: features must be (N, C, ...) arrays, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise UserError("features hold NaN or infinite values; not sent")
    header: dict = {"format": fmt, "shape": list(x.shape)}
    if fmt == "int8":
        axes = tuple(a for a in range(x.ndim) if a != 1)
        scales = (np.abs(x).max(axis=axes, initial=0.0) / np.float32(127)).astype(np.float32)
        shaped = scales.reshape((1, -1) + (1,) * (x.ndim - 2))
        q = np.rint(np.divide(x, shaped, out=np.zeros_like(x), where=shaped > 0))
        values = np.clip(q, -127, 127).astype(np.int8)
        header["scales"] = SCALES  # 4 bytes each before the values (as JSON numbers they took about 21)
        prefix = scales.astype(SCALE_DTYPE).tobytes()
    else:
        with np.errstate(over="ignore"):
            values, prefix = x.astype(_DTYPE[fmt]), b""
        if not np.isfinite(values).all():  # fp16 holds |values| up to 65504; the next tier would refuse the inf
            raise UserError(f"features beyond {fmt}'s range (|values| up to {np.abs(x).max():.4g}); not sent")
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + prefix + values.tobytes()


def decode(payload: bytes) -> np.ndarray:
    """The float32 features of a payload (uint8 for `IMAGE`); a malformed one is refused (UserError, one line)."""
    def bad(why: str) -> UserError:
        return UserError(f"malformed features payload: {why}")

    payload = bytes(payload)
    if len(payload) < 8 or payload[:4] != MAGIC:
        raise bad(f"it does not start with {MAGIC.decode()}")
    (n,) = struct.unpack("<I", payload[4:8])
    if n > MAX_HEADER or 8 + n > len(payload):
        raise bad(f"header length {n} does not fit the {len(payload)}-byte payload")
    try:
        header = json.loads(payload[8:8 + n])
    except (ValueError, RecursionError):  # RecursionError: nested about a thousand deep
        raise bad("the header is not JSON") from None
    if not isinstance(header, dict) or header.get("format") not in (*FORMATS, IMAGE):
        raise bad(f"unknown format {header.get('format') if isinstance(header, dict) else header!r}")
    fmt, shape = header["format"], header.get("shape")
    if (not isinstance(shape, list) or not shape or len(shape) > MAX_DIMS or
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise bad(f"shape {shape!r} is not a list of sizes")
    if fmt == "int8" and len(shape) < 2:
        raise bad("int8 features need a channel axis")
    body = payload[8 + n:]
    scales = header.get("scales")
    scale_bytes = SCALE_DTYPE.itemsize * shape[1] if fmt == "int8" and scales == SCALES else 0
    if len(body) != scale_bytes + payload_bytes(tuple(shape), fmt):
        raise bad(f"{len(body)} bytes of values where shape {shape} in {fmt} takes "
                  f"{scale_bytes + payload_bytes(tuple(shape), fmt)}")
    if scale_bytes:
        scales, body = np.frombuffer(body[:scale_bytes], dtype=SCALE_DTYPE).tolist(), body[scale_bytes:]
    values = np.frombuffer(body, dtype=_DTYPE[fmt]).reshape(shape)
    if fmt == IMAGE:
        return values.copy()
    if fmt != "int8":
        out = values.astype(np.float32)
        if not np.isfinite(out).all():
            raise bad("values hold NaN or infinite numbers")
        return out
    if (not isinstance(scales, list) or len(scales) != shape[1] or
            not all(type(s) in (int, float) and 0 <= s <= FLOAT32_MAX for s in scales)):  # NaN, true fail too
        raise bad(f"int8 needs {shape[1]} finite non-negative scales, one per channel")
    scale = np.asarray(scales, dtype=np.float32).reshape((1, -1) + (1,) * (len(shape) - 2))
    with np.errstate(over="ignore"):  # refused just below
        out = values.astype(np.float32) * scale
    if not np.isfinite(out).all():  # a scale near float32's largest, times 127
        raise bad("int8 values times their scales overflow float32")
    return out
