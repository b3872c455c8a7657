"""The Open Inference Protocol over gRPC: KServe V2's `inference.GRPCInferenceService`, the service Triton serves and
`tritonclient.grpc` speaks (`exitwise serve --grpc-port PORT`; `pip install 'exitwise[grpc]'`).

It runs beside the HTTP routes, on the same event loop, scheduler and metrics (`server.create_app` starts it), and
answers as they do (`oip`): one input, UINT8 pixels [N, C, H, W] or [N, H, W, C] (`parameters.layout`), or BYTES
encoded images [N], in `raw_input_contents` (what tritonclient sends) or `contents`; outputs `class_index`,
`label`, `probability` and `exit` in `raw_output_contents` (what Triton answers); on the first tier of a chain
also the response's parameters `tier` and `degraded`, each a JSON list with one value per image (a V2 gRPC
parameter is a scalar; over HTTP they are the lists themselves). A refused request gets the gRPC
status of its HTTP one, with the same one-line message. Served: ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata, ModelInfer, and ModelStreamInfer (tritonclient's `start_stream` /
`async_stream_infer`: a stream of requests, each answered as soon as its images are, so out of order; the request's
`id` comes back in its answer; a refused one is answered with its one-line `error_message` and the stream goes on,
as Triton does); any other method answers UNIMPLEMENTED. Beside it, gRPC's standard health service
(`grpc.health.v1.Health/Check`, what Kubernetes' gRPC probes and grpc_health_probe call, and `Watch`, what gRPC
clients' own health checking streams): SERVING while the server accepts, NOT_SERVING while it drains.

The messages are built from `SCHEMA` at import (protobuf's descriptor pool, a pool of their own): no generated
code, so any protobuf >= 4.21 reads them. Names and field numbers are KServe's grpc_predict_v2.proto
(tests/test_serve_grpc.py compares them with tritonclient's).
"""
from __future__ import annotations

import asyncio
import functools
import json
import struct
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Sequence

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from ..config import ServerTLS
from .oip import (OUTPUTS, REASONS, VERSION, BadRequest, check_model, model_metadata, output_values,
                  request_timeout_ms, requested_outputs, tensor_images, tier_parameters)
from .scheduler import Answer, FailureLog

SERVICE = "inference.GRPCInferenceService"
_CODE = grpc.StatusCode
STATUS = {400: _CODE.INVALID_ARGUMENT, 404: _CODE.NOT_FOUND, 409: _CODE.FAILED_PRECONDITION,
          413: _CODE.RESOURCE_EXHAUSTED, 499: _CODE.CANCELLED, 503: _CODE.UNAVAILABLE, 504: _CODE.DEADLINE_EXCEEDED,
          500: _CODE.INTERNAL}  # a refusal's gRPC status, by its HTTP one

# KServe V2's messages: (field, number, type); "T*" repeated; "params" a map<string, InferParameter> (its
# ParametersEntry); nested messages under their parent's name.
SCHEMA: dict[str, list[tuple[str, int, str]]] = {
    "ServerLiveRequest": [], "ServerLiveResponse": [("live", 1, "bool")],
    "ServerReadyRequest": [], "ServerReadyResponse": [("ready", 1, "bool")],
    "ModelReadyRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelReadyResponse": [("ready", 1, "bool")],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [("name", 1, "string"), ("version", 2, "string"), ("extensions", 3, "string*")],
    "ModelMetadataRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelMetadataResponse": [("name", 1, "string"), ("versions", 2, "string*"), ("platform", 3, "string"),
                              ("inputs", 4, "ModelMetadataResponse.TensorMetadata*"),
                              ("outputs", 5, "ModelMetadataResponse.TensorMetadata*")],
    "ModelMetadataResponse.TensorMetadata": [("name", 1, "string"), ("datatype", 2, "string"), ("shape", 3, "int64*")],
    "InferParameter": [("bool_param", 1, "bool"), ("int64_param", 2, "int64"), ("string_param", 3, "string"),
                       ("double_param", 4, "double"), ("uint64_param", 5, "uint64")],  # one of them
    "InferTensorContents": [("bool_contents", 1, "bool*"), ("int_contents", 2, "int32*"),
                            ("int64_contents", 3, "int64*"), ("uint_contents", 4, "uint32*"), ("uint64_contents", 5, "uint64*"),
                            ("fp32_contents", 6, "float*"), ("fp64_contents", 7, "double*"),
                            ("bytes_contents", 8, "bytes*")],
    "ModelInferRequest": [("model_name", 1, "string"), ("model_version", 2, "string"), ("id", 3, "string"),
                          ("parameters", 4, "params"), ("inputs", 5, "ModelInferRequest.InferInputTensor*"),
                          ("outputs", 6, "ModelInferRequest.InferRequestedOutputTensor*"),
                          ("raw_input_contents", 7, "bytes*")],
    "ModelInferRequest.InferInputTensor": [("name", 1, "string"), ("datatype", 2, "string"), ("shape", 3, "int64*"),
                                           ("parameters", 4, "params"), ("contents", 5, "InferTensorContents")],
    "ModelInferRequest.InferRequestedOutputTensor": [("name", 1, "string"), ("parameters", 2, "params")],
    "ModelInferResponse": [("model_name", 1, "string"), ("model_version", 2, "string"), ("id", 3, "string"),
                           ("parameters", 4, "params"), ("outputs", 5, "ModelInferResponse.InferOutputTensor*"),
                           ("raw_output_contents", 6, "bytes*")],
    "ModelInferResponse.InferOutputTensor": [("name", 1, "string"), ("datatype", 2, "string"), ("shape", 3, "int64*"),
                                             ("parameters", 4, "params"), ("contents", 5, "InferTensorContents")],
    "ModelStreamInferResponse": [("error_message", 1, "string"), ("infer_response", 2, "ModelInferResponse")],
}
HEALTH = "grpc.health.v1.Health"
# grpc/health/v1/health.proto's messages; its `status` is the enum ServingStatus, written as the same varint as int32
HEALTH_SCHEMA = {"HealthCheckRequest": [("service", 1, "string")], "HealthCheckResponse": [("status", 1, "int32")]}
SERVING, NOT_SERVING, SERVICE_UNKNOWN = 1, 2, 3  # ServingStatus values (SERVICE_UNKNOWN: Watch only)
WATCH_POLL_S = 0.25  # how often a Watch stream looks whether the server still accepts
_SCALARS = {"double": 1, "float": 2, "int64": 3, "uint64": 4, "int32": 5, "bool": 8, "string": 9, "bytes": 12,
            "uint32": 13}
_OPTIONAL, _REPEATED, _MESSAGE = 1, 3, 11


def _file(package: str, schema: dict[str, list[tuple[str, int, str]]]) -> descriptor_pb2.FileDescriptorProto:
    """`schema` as a .proto file's descriptor (proto3)."""
    file = descriptor_pb2.FileDescriptorProto(name=f"exitwise/{package}.proto", package=package, syntax="proto3")
    made: dict[str, descriptor_pb2.DescriptorProto] = {}
    for name, fields in schema.items():
        parent, _, short = name.rpartition(".")
        message = (made[parent].nested_type if parent else file.message_type).add(name=short)
        made[name] = message
        for field_name, number, kind in fields:
            repeated, kind = kind.endswith("*"), kind.rstrip("*")
            field = message.field.add(name=field_name, number=number, label=_REPEATED if repeated else _OPTIONAL)
            if kind in _SCALARS:
                field.type = _SCALARS[kind]
            elif kind == "params":
                entry = message.nested_type.add(name="ParametersEntry")
                entry.options.map_entry = True
                entry.field.add(name="key", number=1, label=_OPTIONAL, type=_SCALARS["string"])
                entry.field.add(name="value", number=2, label=_OPTIONAL, type=_MESSAGE,
                                type_name=f".{package}.InferParameter")
                field.label, field.type, field.type_name = _REPEATED, _MESSAGE, f".{package}.{name}.ParametersEntry"
            else:
                field.type, field.type_name = _MESSAGE, f".{package}.{kind}"
        if name == "InferParameter":
            message.oneof_decl.add(name="parameter_choice")
            for field in message.field:
                field.oneof_index = 0
    return file


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file("inference", SCHEMA))
_POOL.Add(_file("grpc.health.v1", HEALTH_SCHEMA))


@functools.cache
def message(name: str, package: str = "inference") -> type:
    """The message class of `SCHEMA`'s `name` (e.g. "ModelInferRequest"), or of `HEALTH_SCHEMA`'s in its package."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{package}.{name}"))


class _Malformed:
    """What a request that is not its method's message deserializes to, so that the method refuses it as HTTP refuses
    malformed JSON (400: INVALID_ARGUMENT, one line), where gRPC itself would answer UNKNOWN ('Unexpected <class
    ...DecodeError'>: ...') and end a whole stream for one bad message. Its echoed fields are empty."""
    model_name = model_version = id = ""

    def __init__(self, name: str):
        self.refusal = BadRequest(400, f"malformed {name}: not a protobuf message of that type")


def _reader(name: str) -> Callable[[bytes], object]:
    """The deserializer of `name`'s messages: the message, or a `_Malformed` one."""
    parse = message(name).FromString

    def read(data: bytes):
        try:
            return parse(data)
        except DecodeError:
            return _Malformed(name)

    return read


def _parameter(value) -> object:
    """An InferParameter's value (whichever of its fields is set)."""
    which = value.WhichOneof("parameter_choice")
    return None if which is None else getattr(value, which)


def infer_images(request, shape: Sequence[int]) -> np.ndarray:
    """A ModelInferRequest's images as uint8 (N, H, W, C), refused as over HTTP (`oip.tensor_images`)."""
    if len(request.inputs) != 1:
        raise BadRequest(400, "expected exactly one input in 'inputs' (the images)")
    tensor, raw = request.inputs[0], request.raw_input_contents
    if len(raw) > 1:
        raise BadRequest(400, f"{len(raw)} raw_input_contents for one input")
    params = {k: _parameter(v) for k, v in tensor.parameters.items()}
    contents = tensor.contents
    binary = raw[0] if raw else None
    if binary is None and tensor.datatype == "BYTES":  # elements as the binary form has them: length, then bytes
        binary = b"".join(struct.pack("<I", len(b)) + b for b in contents.bytes_contents)
    data = None if binary is not None else list(contents.uint_contents)
    return tensor_images(tensor.datatype, list(tensor.shape), {"data": data}, binary, params, shape)


def infer_response(request, answers: Sequence[Answer], class_names: Sequence[str] | None):
    """The ModelInferResponse: every output (or those the request names) as raw little-endian contents, as Triton
    answers (BYTES: each element a 4-byte length, then its bytes)."""
    wanted = requested_outputs({"outputs": [{"name": o.name} for o in request.outputs]})
    values = output_values(answers, class_names)
    response = message("ModelInferResponse")(model_name=request.model_name, model_version=VERSION,
                                             id=request.id)
    for name, datatype in OUTPUTS:
        if wanted and name not in wanted:
            continue
        response.outputs.add(name=name, datatype=datatype, shape=[len(answers)])
        if datatype == "BYTES":
            raw = b"".join(struct.pack("<I", len(v)) + v for v in (str(v).encode() for v in values[name]))
        else:
            raw = np.asarray(values[name], dtype=np.int64 if datatype == "INT64" else np.float32).tobytes()
        response.raw_output_contents.append(raw)
    for key, values in tier_parameters(answers).items():  # a V2 gRPC parameter is a scalar: each list as JSON
        response.parameters[key].string_param = json.dumps(values)
    return response


class _GrpcCall:
    """A gRPC call (one ModelInfer, or a stream of them) as `server.create_app`'s `answer` wants a request: a watch
    on its client leaving."""

    def __init__(self, context):
        self.watching: dict[object, Callable[[str], None]] = {}
        context.add_done_callback(self._ended)

    def _ended(self, _context) -> None:
        for callback in list(self.watching.values()):
            callback("gone")

    def on_disconnect(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """`callback("gone")` when the call ends before the answer (cancelled, or past the client's deadline); the
        function returned stops the watch (the answer came)."""
        key = object()
        self.watching[key] = callback
        return lambda: self.watching.pop(key, None)


def handler(name: str, platform: str, shape: Sequence[int], class_names: Sequence[str] | None, version: str,
            ready: Callable[[], bool], answer: Callable[[object, np.ndarray, float | None], Awaitable[list[Answer]]],
            refused: Callable[[str], None], observe: Callable[[int, float], None]) -> grpc.GenericRpcHandler:
    """The service's methods for one model (`name`, served on `platform`, taking `shape` (C, H, W) images) of
    exitwise `version`: `ready()` says whether it accepts; `answer(call, images, timeout_ms)` runs images through the
    scheduler (`server.create_app`'s); `refused(reason)` counts a refusal, `observe(status, start)` times an
    infer call by the HTTP status it corresponds to."""
    metadata = model_metadata(name, shape, platform)
    failures = FailureLog("a gRPC call")

    def count(e: BadRequest) -> BadRequest:
        refused(REASONS.get(e.status, "bad_request"))
        return e

    async def abort(context, e: BadRequest) -> None:
        await context.abort(STATUS.get(e.status, grpc.StatusCode.INVALID_ARGUMENT), e.message)

    async def refuse(context, e: BadRequest) -> None:
        await abort(context, count(e))

    def unary(method):
        """`method`, refusing a malformed request message first (ModelInfer's `infer` does so itself)."""
        async def checked(request, context):
            if isinstance(request, _Malformed):
                await refuse(context, request.refusal)
            return await method(request, context)
        return checked

    async def server_live(request, context):
        return message("ServerLiveResponse")(live=True)

    async def server_ready(request, context):
        return message("ServerReadyResponse")(ready=ready())

    async def model_ready(request, context):
        try:
            check_model(name, request.name, request.version)
        except BadRequest as e:
            await refuse(context, e)
        return message("ModelReadyResponse")(ready=ready())

    async def server_metadata(request, context):
        return message("ServerMetadataResponse")(name="exitwise", version=version)

    async def get_model_metadata(request, context):
        try:
            check_model(name, request.name, request.version)
        except BadRequest as e:
            await refuse(context, e)
        tensor = message("ModelMetadataResponse.TensorMetadata")
        return message("ModelMetadataResponse")(
            name=name, versions=metadata["versions"], platform=metadata["platform"],
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in metadata["inputs"]],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in metadata["outputs"]])

    async def infer(request, call: _GrpcCall):
        """One ModelInferRequest: its ModelInferResponse, or the BadRequest it is refused with (counted)."""
        start, status = time.perf_counter(), 500
        try:
            if isinstance(request, _Malformed):
                raise request.refusal
            check_model(name, request.model_name, request.model_version)
            images = infer_images(request, shape)
            requested_outputs({"outputs": [{"name": o.name} for o in request.outputs]})  # before any work
            timeout_ms = request_timeout_ms({k: _parameter(v) for k, v in request.parameters.items()})
            response = infer_response(request, await answer(call, images, timeout_ms), class_names)
            status = 200
            return response
        except BadRequest as e:
            status = e.status
            refusal = e
        except asyncio.CancelledError:  # the call's stream was cancelled by its client
            status = 499
            count(BadRequest(499, "the client left"))
            raise
        except Exception as e:  # noqa: BLE001  a one-line INTERNAL, as HTTP's 500
            failures(e)
            refusal = BadRequest(500, f"internal error: {type(e).__name__}: {e}")
        finally:
            observe(status, start)
        return count(refusal)

    async def model_infer(request, context):
        response = await infer(request, _GrpcCall(context))
        if isinstance(response, BadRequest):
            await abort(context, response)
        return response

    async def model_stream_infer(requests: AsyncIterator, context):
        """Every request of the stream taken at once, each answered when its images are (its id says which)."""
        call, done = _GrpcCall(context), asyncio.Queue()
        stream_answer, infer_answer = message("ModelStreamInferResponse"), message("ModelInferResponse")

        async def one(request) -> None:
            response = await infer(request, call)
            done.put_nowait(stream_answer(infer_response=response) if not isinstance(response, BadRequest) else
                            stream_answer(error_message=response.message, infer_response=infer_answer(
                                model_name=request.model_name, model_version=request.model_version, id=request.id)))

        async def read() -> None:
            try:
                async with asyncio.TaskGroup() as group:
                    async for request in requests:
                        group.create_task(one(request))
            finally:
                done.put_nowait(None)  # the client closed its side and every request is answered (or it left)

        reader = asyncio.create_task(read())
        try:
            while (item := await done.get()) is not None:
                yield item
            await reader  # the client's stream failed: so does this call
        finally:
            reader.cancel()

    methods = {"ServerLive": (server_live, "ServerLiveRequest", "ServerLiveResponse"),
               "ServerReady": (server_ready, "ServerReadyRequest", "ServerReadyResponse"),
               "ModelReady": (model_ready, "ModelReadyRequest", "ModelReadyResponse"),
               "ServerMetadata": (server_metadata, "ServerMetadataRequest", "ServerMetadataResponse"),
               "ModelMetadata": (get_model_metadata, "ModelMetadataRequest", "ModelMetadataResponse"),
               "ModelInfer": (model_infer, "ModelInferRequest", "ModelInferResponse")}
    handlers = {method: grpc.unary_unary_rpc_method_handler(fn if method == "ModelInfer" else unary(fn),
                                                            request_deserializer=_reader(request),
                                                            response_serializer=message(response).SerializeToString)
                for method, (fn, request, response) in methods.items()}
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        model_stream_infer, request_deserializer=_reader("ModelInferRequest"),
        response_serializer=message("ModelStreamInferResponse").SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def health(ready: Callable[[], bool]) -> grpc.GenericRpcHandler:
    """grpc.health.v1 for the whole server (service "") or its inference service: SERVING while `ready()`, else
    NOT_SERVING. `Check` answers once (another service name: NOT_FOUND); `Watch` streams the status at once and again
    when it changes, as the health protocol asks (another service name: SERVICE_UNKNOWN, the stream kept open). A
    server that stops accepting never accepts again (it drains, then exits), so then every Watch stream ends, its
    own service's after sending NOT_SERVING: the drain does not wait for the watchers."""
    request, response = (message(name, "grpc.health.v1") for name in ("HealthCheckRequest", "HealthCheckResponse"))

    async def check(call, context):
        if call.service not in ("", SERVICE):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {call.service!r}; this server serves "
                                                           f"{SERVICE!r} (or '' for the whole server)")
        return response(status=SERVING if ready() else NOT_SERVING)

    async def watch(call, context):
        known, sent = call.service in ("", SERVICE), None
        while True:
            accepting = ready()
            now = (SERVING if accepting else NOT_SERVING) if known else SERVICE_UNKNOWN
            if now != sent:
                yield response(status=now)
                sent = now
            if not accepting:
                return
            await asyncio.sleep(WATCH_POLL_S)

    codec = {"request_deserializer": request.FromString, "response_serializer": response.SerializeToString}
    return grpc.method_handlers_generic_handler(HEALTH, {"Check": grpc.unary_unary_rpc_method_handler(check, **codec),
                                                         "Watch": grpc.unary_stream_rpc_method_handler(watch, **codec)})


async def start(host: str, port: int, rpc_handlers: Sequence[grpc.GenericRpcHandler], max_message_bytes: int,
                reuse_port: bool = False, tls: ServerTLS | None = None) -> tuple[grpc.aio.Server, int]:
    """A gRPC server on the running event loop, listening on host:port (0: any free port); (server, its port).
    `reuse_port`: several processes share the port (`serve --processes`); else a port in use is refused. `tls`:
    with its certificate, and with its client CAs for clients that show a certificate they signed only (None:
    plain)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse_port)),
                                      ("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes)])
    server.add_generic_rpc_handlers(tuple(rpc_handlers))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = (server.add_insecure_port(address) if tls is None else server.add_secure_port(
            address, grpc.ssl_server_credentials([(Path(tls.keyfile).read_bytes(), Path(tls.certfile).read_bytes())],
                                                 None if tls.ca_certs is None else Path(tls.ca_certs).read_bytes(),
                                                 tls.ca_certs is not None)))
    except RuntimeError as e:
        bound, why = 0, e
    else:
        why = "in use"
    if not bound:
        raise OSError(f"cannot listen on {address} for gRPC: {why}")
    await server.start()
    return server, bound
