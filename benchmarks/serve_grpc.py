"""gRPC against HTTP on one `exitwise serve --model b-resnet11 --grpc-port PORT`, measured in one run.

The same CIFAR-10 test JPEGs, one per request, as the payload each protocol carries for encoded images: HTTP
`POST /v1/predict` with the JPEG as the body (serve_load's client: raw HTTP/1.1 over keep-alive connections) and
gRPC `ModelInfer` with a BYTES input in `raw_input_contents` (grpc.aio, one channel, the calls multiplexed on it),
both from this process on uvloop. Every round times each protocol in turn: --sequential requests one at a time (ms
per request: what a lone client waits), then a closed loop with --concurrency in flight for --seconds (answered per
second, and the server's CPU per request, all its threads and its event loop's, from /proc). Printed: each
protocol's best round and the median of the rounds' gRPC/HTTP ratios. The client shares the machine's cores with
the server: its CPU per request is printed too, and only ratios within one run compare.

    python benchmarks/serve_grpc.py [--rounds 5] [--concurrency 64] [--seconds 4] [-- any exitwise serve flags]
"""
import argparse
import asyncio
import socket
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load as sl  # noqa: E402

from exitwise.deploy import oip_grpc  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GrpcClient:
    """ModelInfer calls with one JPEG each, on one grpc.aio channel."""

    def __init__(self, address: str, model: str):
        import grpc
        self.channel = grpc.aio.insecure_channel(address)
        self.infer = self.channel.unary_unary(
            f"/{oip_grpc.SERVICE}/ModelInfer", request_serializer=oip_grpc.message("ModelInferRequest").SerializeToString,
            response_deserializer=oip_grpc.message("ModelInferResponse").FromString)
        self.model = model

    def request(self, blob: bytes):
        request = oip_grpc.message("ModelInferRequest")(model_name=self.model)
        request.inputs.add(name="image", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(struct.pack("<I", len(blob)) + blob)
        return request


async def grpc_sequential(address: str, model: str, blobs: list[bytes]) -> float:
    client = GrpcClient(address, model)
    start = time.perf_counter()
    for blob in blobs:
        await client.infer(client.request(blob))
    took = time.perf_counter() - start
    await client.channel.close()
    return took


async def grpc_closed_loop(address: str, model: str, blobs: list[bytes], concurrency: int, seconds: float) -> int:
    client = GrpcClient(address, model)
    await client.infer(client.request(blobs[0]))  # connected
    done, start = [0], time.perf_counter()

    async def worker(i: int) -> None:
        while time.perf_counter() - start < seconds:
            await client.infer(client.request(blobs[(i + done[0]) % len(blobs)]))
            done[0] += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    await client.channel.close()
    return done[0]


async def http_closed_loop(server: sl.Server, blobs: list[bytes], concurrency: int, seconds: float) -> int:
    pool, done = sl.Pool(server.host, server.port), [0]
    await pool.open(concurrency)
    start = time.perf_counter()

    async def worker(i: int) -> None:
        while time.perf_counter() - start < seconds:
            status, _ = await pool.post(blobs[(i + done[0]) % len(blobs)])
            assert status == 200, status
            done[0] += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done[0]


def timed(server: sl.Server, run) -> dict:
    """One closed-loop run: answered per second, CPU per request of the server (all, event loop) and the client."""
    cpu0, wall0, server0 = time.process_time(), time.perf_counter(), server.cpu_seconds()
    n = sl.run_async(run())
    wall, client = time.perf_counter() - wall0, time.process_time() - cpu0
    used, loop = (b - a for a, b in zip(server0, server.cpu_seconds()))
    return {"rate": n / wall, "server_ms": 1e3 * used / n, "loop_ms": 1e3 * loop / n, "client_ms": 1e3 * client / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=sl.SHARED / "data/cifar10-jpg.tar.gz")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sequential", type=int, default=300)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("flags", nargs="*", help="exitwise serve flags (default: --model b-resnet11)")
    args = p.parse_args()
    blobs, _, _ = sl.test_jpegs(args.data, 600)
    port = free_port()
    server = sl.Server((args.flags or ["--model", "b-resnet11"]) + ["--grpc-port", str(port)])
    model = server.serving.split("serving ", 1)[1].split(" ", 1)[0]
    address = f"127.0.0.1:{port}"
    print(server.serving, f"gRPC on {address}", flush=True)
    rows: dict[str, list[dict]] = {"http": [], "grpc": []}
    try:
        sl.run_async(sl._sequential(server.host, server.port, blobs[:100]))  # warm-up, both ways
        sl.run_async(grpc_sequential(address, model, blobs[:100]))
        for _ in range(args.rounds):
            seq = blobs[:args.sequential]
            http = timed(server, lambda: http_closed_loop(server, blobs, args.concurrency, args.seconds))
            http["sequential_ms"] = 1e3 * sl.run_async(sl._sequential(server.host, server.port, seq)) / len(seq)
            grpc = timed(server, lambda: grpc_closed_loop(address, model, blobs, args.concurrency, args.seconds))
            grpc["sequential_ms"] = 1e3 * sl.run_async(grpc_sequential(address, model, seq)) / len(seq)
            rows["http"].append(http)
            rows["grpc"].append(grpc)
    finally:
        server.stop()
    print(f"{args.rounds} rounds, the protocols in turns; client in this process, {args.concurrency} in flight for "
          f"{args.seconds:g} s; sequential: {args.sequential} requests one at a time")
    for name, runs in rows.items():
        best = max(runs, key=lambda r: r["rate"])
        print(f"{name:>5}: capacity {best['rate']:.0f}/s (server {best['server_ms']:.3f} ms of CPU per request, event "
              f"loop {best['loop_ms']:.3f}, client {best['client_ms']:.3f}); sequential "
              f"{min(r['sequential_ms'] for r in runs):.3f} ms per request")
    for key, what in (("rate", "capacity"), ("loop_ms", "event loop CPU per request"),
                      ("sequential_ms", "sequential ms per request")):
        ratios = [g[key] / h[key] for g, h in zip(rows["grpc"], rows["http"])]
        print(f"gRPC / HTTP {what}: median {np.median(ratios):.2f}x (rounds {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
