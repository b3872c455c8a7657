"""The Open Inference Protocol (KServe V2, spoken by Triton, KServe and Seldon) and `/v1/predict`: requests to
uint8 images, answers to JSON. Pure functions; a request that cannot be served raises `BadRequest` (4xx).

Inputs of `POST /v2/models/{name}/infer` (one input, any name):
* UINT8 pixels, shape [N, C, H, W] (NCHW), or [N, H, W, C] with `"parameters": {"layout": "NHWC"}`
  (a shape that only fits NHWC is read as NHWC); `data` a flat row-major list, or binary (below);
* BYTES, shape [N]: encoded images (JPEG, PNG, ...): base64 strings in JSON, raw bytes in binary.
Binary data (Triton's binary tensor extension, what tritonclient sends): the request body is the JSON header
(`Inference-Header-Content-Length` bytes) then each input's bytes, its size in `parameters.binary_data_size`;
BYTES elements are each a 4-byte little-endian length and the bytes.
Outputs, per image: `class_index` (INT64), `label` (BYTES), `probability` (FP32), `exit` (INT64).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import UserError
from ..images import decode_image
from .scheduler import Answer, Expired, QueueFull, TooLarge

OUTPUTS = (("class_index", "INT64"), ("label", "BYTES"), ("probability", "FP32"), ("exit", "INT64"))
INPUT_NAME = "image"


REASONS = {413: "too_large", 404: "unknown_model", 499: "disconnected", 503: "overloaded", 504: "timeout",
           408: "slow_body", 500: "failed"}  # a refusal's label in `exitwise_rejected_requests_total` (else "bad_request")


MESSAGE_CHARS = 400  # a refusal's message at most: it may quote what the client sent (a 16 MB 'datatype'), and over
# gRPC it travels in a header (percent-encoded) that clients refuse past 8-16 KiB, so the call would fail otherwise


class BadRequest(Exception):
    """A request the server refuses: an HTTP status and a one-line message (its middle cut past MESSAGE_CHARS)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, " ".join(str(message).split())
        if len(self.message) > MESSAGE_CHARS:
            self.message = f"{self.message[:MESSAGE_CHARS // 2 - 3]} ... {self.message[-(MESSAGE_CHARS // 2 - 2):]}"


async def read_body(receive, content_length: str | None, limit: int, within_s: float | None = None,
                    flag: str = "--timeout-ms") -> bytes:
    """An ASGI request's body, at most `limit` bytes (413, as declared or as it arrives); with `within_s`, all there
    within that many seconds of the first wait for it (408, naming `flag`, the option that set it): a client (or a
    tier before) that withholds or trickles it would hold a place among the requests in flight. A body that arrived
    with its headers (most do) is read without a timer."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise BadRequest(413, f"request body of {int(content_length)} bytes is over the limit of {limit} bytes")
    arrived = getattr(getattr(receive, "__self__", None), "message_event", None)  # uvicorn's: body waiting
    parts, size, deadline = [], 0, None
    while True:
        if within_s is None or deadline is None and (arrived.is_set() if arrived is not None else not parts):
            message = await receive()  # there already (under another server: the first part, untimed)
        else:
            deadline = deadline or asyncio.get_running_loop().time() + within_s
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BadRequest(408, f"the request body did not arrive within {within_s * 1e3:g} ms ({flag})") \
                    from None
        if message["type"] == "http.disconnect":
            raise BadRequest(499, "client disconnected")
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise BadRequest(413, f"request body is over the limit of {limit} bytes")
        parts.append(part)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def not_taken(e: QueueFull | TooLarge, rows: str, max_queue: int) -> BadRequest:
    """The refusal of a submission the scheduler would not take: 503 to retry (its queue is full now), or 413 (`rows`,
    such as "5 images", are more than it ever holds: retrying would not help)."""
    if isinstance(e, QueueFull):
        return BadRequest(503, f"overloaded, try again: {e}")
    return BadRequest(413, f"{rows} in one request; this server holds at most {max_queue} (--max-queue)")


def answered(why: str, outcomes: list, timeout_ms: float) -> list[Answer]:
    """A request's samples as `Answers.wait` left them (why the wait ended, each sample's outcome): their answers,
    or the refusal they call for: 499 the client left, 504 not answered within `timeout_ms` (the wait's deadline
    passed, or the scheduler expired a sample), 500 inference failed."""
    if why == "gone":
        raise BadRequest(499, "client disconnected")
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if why == "late" or any(isinstance(e, Expired) for e in errors):
        raise BadRequest(504, f"not answered within {timeout_ms:g} ms")
    if errors:
        raise BadRequest(500, f"inference failed: {errors[0]}")
    return outcomes


VERSION = "1"  # the one version of a served model (metadata's `versions`, a response's `model_version`)


def check_model(served: str, model: str, version: str = "") -> None:
    """A request's model name (and version, where its path or message names one) against the model served."""
    if model != served:
        raise BadRequest(404, f"unknown model {model!r}; this server serves {served!r}")
    if version not in ("", VERSION):
        raise BadRequest(404, f"model {served!r} has version {VERSION} only, not {version!r}")


def model_metadata(name: str, shape: Sequence[int], platform: str) -> dict:
    c, h, w = shape
    return {"name": name, "versions": [VERSION], "platform": platform,
            "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, c, h, w],
                        "parameters": {"layout": "NCHW (or NHWC with parameters.layout); or BYTES [-1] of "
                                                 "encoded images (JPEG, PNG)"}}],
            "outputs": [{"name": n, "datatype": t, "shape": [-1]} for n, t in OUTPUTS]}


def decode_images(blobs: Sequence[bytes], shape: Sequence[int], names: Sequence[str] | None = None) -> np.ndarray:
    """Encoded images to uint8 (N, H, W, C); an image that is not one, or of another size, is refused."""
    c, h, w = shape
    out = np.empty((len(blobs), h, w, c), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        where = names[i] if names else f"#{i}"
        if not blob:
            raise BadRequest(400, f"image {where} is empty")
        try:
            pixels = decode_image(blob, where, c, size=(h, w))  # another size refused from its header, undecoded
        except UserError as e:
            raise BadRequest(400, str(e)) from None
        if pixels.shape != out.shape[1:]:
            raise BadRequest(400, f"image {where} is {pixels.shape[1]}x{pixels.shape[0]}, but the model takes {w}x{h}")
        out[i] = pixels
    if not len(out):
        raise BadRequest(400, "no image in the request")
    return out


def parse_infer(body: bytes, header_length: str | None, shape: Sequence[int]) -> tuple[np.ndarray, dict]:
    """An infer request's images as uint8 (N, H, W, C), and its JSON (for `id` and `outputs`)."""
    if not body:
        raise BadRequest(400, "empty request body: expected an inference request in JSON")
    size = len(body)
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()):  # int() takes "+1", "1_0", " 1", "١"
            raise BadRequest(400, "Inference-Header-Content-Length is not a number")
        size = int(header_length)
        if not 0 < size <= len(body):
            raise BadRequest(400, f"Inference-Header-Content-Length {size} does not fit a body of {len(body)} bytes")
    try:
        request = json.loads(body[:size])
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"malformed JSON: {e}") from None
    except RecursionError:  # arrays or objects nested about a thousand deep: Python's parser gives up
        raise BadRequest(400, "malformed JSON: nested too deeply") from None
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(400, "expected exactly one input in 'inputs' (the images)")
    request_id = request.get("id")  # null: none
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(400, "the request's 'id' must be a string")
    if request_id and not request_id.isascii():  # it comes back in the answer, which is UTF-8
        try:
            request_id.encode()
        except UnicodeEncodeError:
            raise BadRequest(400, "the request's 'id' is not text: a lone surrogate (\\ud800-\\udfff)") from None
    tensor = inputs[0]
    binary = body[size:]
    params = tensor.get("parameters")
    params = {} if params is None else params  # null: none (a list or a number is refused)
    if not isinstance(params, dict):
        raise BadRequest(400, "input parameters must be an object")
    if "binary_data_size" in params:
        n = params["binary_data_size"]
        if type(n) is not int or n != len(binary):  # true is no size
            raise BadRequest(400, f"binary_data_size {n} but {len(binary)} bytes follow the JSON header")
    elif binary:
        raise BadRequest(400, "bytes after the JSON header but no binary_data_size")
    else:
        binary = None
    return tensor_images(tensor.get("datatype"), tensor.get("shape"), tensor, binary, params, shape), request


def tensor_images(datatype, tensor_shape, tensor: dict, binary: bytes | None, params: dict,
                  shape: Sequence[int]) -> np.ndarray:
    """One input tensor's images as uint8 (N, H, W, C), over HTTP or gRPC (`oip_grpc`): UINT8 pixels or BYTES encoded
    images, as `binary` (the raw bytes) or else `tensor["data"]` (a JSON list)."""
    if not (isinstance(tensor_shape, list) and all(type(d) is int and d >= 0 for d in tensor_shape)):
        raise BadRequest(400, "input 'shape' must be a list of non-negative integers")
    if datatype == "UINT8":
        return _pixels(tensor, tensor_shape, binary, params, shape)
    if datatype == "BYTES":
        return _encoded(tensor, tensor_shape, binary, shape)
    raise BadRequest(400, f"input datatype {datatype!r} is not served: send UINT8 pixels or BYTES encoded images")


def _pixels(tensor: dict, tensor_shape: list, binary: bytes | None, params: dict, shape: Sequence[int]) -> np.ndarray:
    c, h, w = shape
    layout = params.get("layout")
    if layout not in (None, "NCHW", "NHWC"):
        raise BadRequest(400, f"layout {layout!r}: NCHW or NHWC")
    if layout is None:
        layout = "NHWC" if tensor_shape[1:] == [h, w, c] and tensor_shape[1:] != [c, h, w] else "NCHW"
    want = [c, h, w] if layout == "NCHW" else [h, w, c]
    if len(tensor_shape) != 4 or tensor_shape[1:] != want or tensor_shape[0] < 1:
        raise BadRequest(400, f"input shape {tensor_shape}: the model takes UINT8 [N, {', '.join(map(str, want))}] "
                              f"({layout})")
    count = math.prod(tensor_shape)
    if binary is not None:
        if len(binary) != count:
            raise BadRequest(400, f"{len(binary)} bytes of UINT8 data for shape {tensor_shape} ({count} values)")
        pixels = np.frombuffer(binary, dtype=np.uint8)
    else:
        data = tensor.get("data")
        if not isinstance(data, list):
            raise BadRequest(400, "input 'data' must be a list of integers 0..255")
        try:  # as JSON gave them: floats, booleans or strings are not UINT8 values (a nested list is, row-major)
            values = np.asarray(data).reshape(-1)
        except (ValueError, TypeError, OverflowError):
            raise BadRequest(400, "input 'data' must be a list of integers 0..255") from None
        if values.size and values.dtype.kind not in "iu":
            raise BadRequest(400, "input 'data' must be a list of integers 0..255")
        if values.size != count:
            raise BadRequest(400, f"{values.size} values of data for shape {tensor_shape} ({count} values)")
        if values.size and (values.min() < 0 or values.max() > 255):
            raise BadRequest(400, "UINT8 data must be integers 0..255")
        pixels = values.astype(np.uint8)
    pixels = pixels.reshape(tensor_shape)
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1) if layout == "NCHW" else pixels)


def _encoded(tensor: dict, tensor_shape: list, binary: bytes | None, shape: Sequence[int]) -> np.ndarray:
    if len(tensor_shape) != 1 or tensor_shape[0] < 1:
        raise BadRequest(400, f"BYTES input shape {tensor_shape}: expected [N], one encoded image per element")
    if binary is not None:
        blobs, at = [], 0
        while at < len(binary):
            if at + 4 > len(binary):
                raise BadRequest(400, "truncated BYTES element length in the binary data")
            (n,) = struct.unpack_from("<I", binary, at)
            blobs.append(binary[at + 4:at + 4 + n])
            if len(blobs[-1]) != n:
                raise BadRequest(400, "truncated BYTES element in the binary data")
            at += 4 + n
    else:
        data = tensor.get("data")
        if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
            raise BadRequest(400, "BYTES data in JSON must be a list of base64 strings (one encoded image each)")
        try:
            blobs = [base64.b64decode(d, validate=True) for d in data]
        except (binascii.Error, ValueError):
            raise BadRequest(400, "BYTES data in JSON must be base64 strings") from None
    if len(blobs) != tensor_shape[0]:
        raise BadRequest(400, f"{len(blobs)} BYTES elements for shape {tensor_shape}")
    return decode_images(blobs, shape)


def request_timeout_ms(parameters) -> float | None:
    """A request's own deadline in ms from its parameters' `timeout` (Triton's: whole microseconds, what tritonclient's
    `infer(..., timeout=)` sends; 0 or none: the server's --timeout-ms alone)."""
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        raise BadRequest(400, "the request's 'parameters' must be an object")
    timeout = parameters.get("timeout")
    if timeout is None or timeout == 0:
        return None
    if type(timeout) is not int or timeout < 0:
        raise BadRequest(400, f"parameters.timeout {timeout!r}: a whole number of microseconds, 0 or more")
    return timeout / 1e3


def requested_outputs(request: dict) -> list[str]:
    """The outputs an infer request names (none: all), refused before any work when one is unknown."""
    outputs = request.get("outputs") or []
    if not isinstance(outputs, list):
        raise BadRequest(400, "'outputs' must be a list")
    if not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        raise BadRequest(400, "each of 'outputs' must be an object with a 'name'")
    wanted = [o["name"] for o in outputs]
    unknown = [w for w in wanted if w not in dict(OUTPUTS)]
    if unknown:
        raise BadRequest(400, f"unknown output {unknown[0]!r}; outputs: {', '.join(n for n, _ in OUTPUTS)}")
    return wanted


def output_values(answers: Sequence[Answer], class_names: Sequence[str] | None) -> dict[str, list]:
    """Each output's values, one per image (`OUTPUTS`)."""
    return {"class_index": [a.prediction for a in answers],
            "label": [class_names[a.prediction] if class_names else str(a.prediction) for a in answers],
            "probability": [round(a.probability, 6) for a in answers],
            "exit": [a.exit for a in answers]}


def tier_parameters(answers: Sequence[Answer]) -> dict[str, list]:
    """On a tier of a chain, the response's parameters: which tier answered each image and whether degraded; else
    none."""
    if not answers or not hasattr(answers[0], "tier"):
        return {}
    return {"tier": [a.tier for a in answers], "degraded": [a.degraded for a in answers]}


def infer_response(name: str, request: dict, answers: Sequence[Answer], class_names: Sequence[str] | None) -> dict:
    """The V2 response: every output (or those the request names), one value per image."""
    values = output_values(answers, class_names)
    wanted = requested_outputs(request)
    outputs = [{"name": n, "datatype": t, "shape": [len(answers)], "data": values[n]}
               for n, t in OUTPUTS if not wanted or n in wanted]
    response = {"model_name": name, "model_version": VERSION, "outputs": outputs}
    if parameters := tier_parameters(answers):
        response["parameters"] = parameters
    if isinstance(request.get("id"), str):
        response["id"] = request["id"]
    return response


PREDICTION_FIELDS = ("image", "class", "class_index", "probability", "exit")  # a row of `exitwise predict`'s output


def prediction_row(image: str | None, class_index: int, probability: float, exit: int,
                   class_names: Sequence[str] | None) -> dict:
    """One image's row of `exitwise predict`'s CSV or JSON and of `/v1/predict`'s answer (`PREDICTION_FIELDS`, a
    literal here: it runs per image on the server): the class's name where the model has names, else its index
    as text; the probability rounded to 6 places."""
    return {"image": image, "class": class_names[class_index] if class_names else str(class_index),
            "class_index": int(class_index), "probability": round(float(probability), 6), "exit": int(exit)}


@dataclass(frozen=True)
class ImagePrediction:
    """One image's answer: its class at the exit it took (0 = first) and that class's softmax probability there;
    `to_json()` is its row (`prediction_row`)."""
    image: str | None   # the file's name (None: an image sent without one)
    label: str          # the class name (its index, as text, when the model has none); "class" in the files
    class_index: int
    probability: float  # rounded to 6 places, as written
    exit: int

    @classmethod
    def of(cls, image: str | None, class_index: int, probability: float, exit: int,
           class_names: Sequence[str] | None) -> ImagePrediction:
        return cls(*prediction_row(image, class_index, probability, exit, class_names).values())  # in field order

    def to_json(self) -> dict:
        return dict(zip(PREDICTION_FIELDS, (self.image, self.label, self.class_index, self.probability, self.exit)))


def predictions(answers: Sequence[Answer], class_names: Sequence[str] | None,
                names: Sequence[str | None]) -> list[dict]:
    """`/v1/predict`'s rows (`prediction_row`; on a tier of a chain with `tier` and `degraded`)."""
    rows = [prediction_row(n, a.prediction, a.probability, a.exit, class_names) for n, a in zip(names, answers)]
    for key, values in tier_parameters(answers).items():
        for row, value in zip(rows, values):
            row[key] = value
    return rows
