"""Where does serving lose early exit's gain? The server's two halves timed apart, in one process, no network.

    python benchmarks/serve_parts.py [--model b-resnet11] [--precision auto] [--images 2560] [--rounds 3]

1. The scheduler alone (`deploy.scheduler` over `TorchRunner`, what `exitwise serve` runs): one image per
   submission, --inflight at a time (a new one as each is answered, as a closed-loop client keeps them), early exit
   and the full network (--no-early-exit's runner) in turns; their time ratio beside the offline ratio
   (`run_early_exit` / `run_backbone`, the same prepared network) at batch 64 and 256, in the same rounds.
2. The HTTP app alone (`deploy.server.create_app`) on a model that costs nothing (every sample answered at its
   first stage at once): the event loop's CPU per `POST /v1/predict` of one CIFAR-10 JPEG, called as uvicorn calls
   the app (no sockets, no HTTP parsing), 32 requests in flight; then the same with decoding replaced by a
   look-up of the same pixels, to show what decoding costs the loop beyond its own time: simplejpeg lets go of
   Python's lock while it decodes, and taking it back from the scheduler's thread costs more than the decoding.

`benchmarks/serve_load.py` measures the two together, through real sockets, sharing the machine's cores with its
client. Timings: run it alone on a quiet machine.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load as sl  # noqa: E402

from exitwise.allocator import keep_freed_memory  # noqa: E402
from exitwise.config import SchedulerConfig, ServeConfig  # noqa: E402
from exitwise.data import ImageSet  # noqa: E402
from exitwise.deploy import server  # noqa: E402
from exitwise.deploy.oip import decode_images  # noqa: E402
from exitwise.deploy.runner import StepOut  # noqa: E402
from exitwise.deploy.scheduler import Scheduler  # noqa: E402
from exitwise.device import machine  # noqa: E402
from exitwise.runtime import run_backbone, run_early_exit, warm_up  # noqa: E402
from exitwise.serve_torch import make_runner  # noqa: E402


def scheduled_seconds(runner, images: np.ndarray, inflight: int, max_batch: int) -> float:
    """Seconds for every image through a scheduler, one image per submission, `inflight` of them at a time."""
    scheduler = Scheduler(runner, SchedulerConfig(max_batch=max_batch, max_queue=len(images) + 1)).start()
    done, following, lock = threading.Semaphore(0), iter(range(len(images))), threading.Lock()

    def submit_next(_=None) -> None:
        with lock:
            i = next(following, None)
        if i is None:
            done.release()
            return
        scheduler.submit(images[i:i + 1])[0].add_done_callback(submit_next)

    start = time.perf_counter()
    for _ in range(inflight):
        submit_next()
    for _ in range(inflight):
        done.acquire()
    seconds = time.perf_counter() - start
    scheduler.close(5)
    return seconds


class FreeRunner:
    """A one-stage model that costs nothing: every sample leaves at once with class 0."""
    num_exits, input_shape, class_names, name, platform = 1, (3, 32, 32), tuple("0123456789"), "free", "none"
    micro_batch = 1 << 20  # no network call to split

    def to_input(self, images):
        return images

    def init_state(self, n):
        return np.zeros((n, 0))

    def step(self, k, features, state):
        n = len(features)
        return StepOut(features, np.ones(n, bool), np.zeros(n, np.int64), np.ones(n, np.float32), state)

    def take(self, features, rows):
        return features[rows]

    def concat(self, parts):
        return np.concatenate(parts)


async def _requests(app, blobs: list[bytes], n: int, inflight: int) -> None:
    """`n` one-image `POST /v1/predict` calls of the ASGI app, `inflight` at a time; each must answer 200."""
    limit = asyncio.Semaphore(inflight)

    async def one(blob: bytes) -> None:
        scope = {"type": "http", "method": "POST", "path": "/v1/predict", "query_string": b"", "root_path": "",
                 "http_version": "1.1", "scheme": "http",
                 "headers": [(b"content-type", b"image/jpeg"), (b"content-length", str(len(blob)).encode())]}
        given, stay, status = [False], asyncio.Event(), []

        async def receive():
            if not given[0]:
                given[0] = True
                return {"type": "http.request", "body": blob, "more_body": False}
            await stay.wait()  # the client stays until answered

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])

        async with limit:
            await app(scope, receive, send)
        if status != [200]:
            raise SystemExit(f"the app answered {status}")

    await asyncio.gather(*(one(blobs[i % len(blobs)]) for i in range(n)))


def loop_cpu_per_request(blobs: list[bytes], n: int, inflight: int) -> tuple[float, float]:
    """(event-loop CPU s, wall s) per request of the app over `FreeRunner`."""
    app = server.create_app(FreeRunner(), ServeConfig(scheduler=SchedulerConfig(max_queue=10 * inflight)))
    try:
        sl.run_async(_requests(app, blobs, n // 5, inflight))  # warm-up
        wall, cpu = time.perf_counter(), time.thread_time()
        sl.run_async(_requests(app, blobs, n, inflight))
        return (time.thread_time() - cpu) / n, (time.perf_counter() - wall) / n
    finally:
        app.state.scheduler.close(5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=sl.SHARED / "data/cifar10-jpg.tar.gz")
    p.add_argument("--model", default="b-resnet11")
    p.add_argument("--images", type=int, default=2560)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--inflight", default="64,256", help="images in flight in the scheduler runs")
    p.add_argument("--max-batch", type=int, default=64, help="the scheduler's (exitwise serve's default)")
    p.add_argument("--requests", type=int, default=10000, help="requests through the HTTP app per variant")
    p.add_argument("--precision", default="auto", help="as `exitwise serve --precision` (auto: measured here)")
    args = p.parse_args()
    keep_freed_memory()  # as `exitwise serve` does
    blobs, labels, classes = sl.test_jpegs(args.data, args.images)
    images = decode_images(blobs, (3, 32, 32))
    early = make_runner(model=args.model, precision=args.precision)
    full = make_runner(model=args.model, precision=early.precision, micro_batch=early.micro_batch, early_exit=False)
    print(f"{args.model} on {machine().describe()}; precision {early.precision}, micro-batch {early.micro_batch}; "
          f"{len(images)} CIFAR-10 test images")

    data = ImageSet(torch.from_numpy(images), torch.from_numpy(labels), classes)
    network, model, mb = early.network, early.model, early.micro_batch
    offline = {"early": lambda b: run_early_exit(network, data, model.thresholds, model.policy, b, micro_batch=mb),
               "full": lambda b: run_backbone(network, data, b, micro_batch=mb)}
    warm_up(network, data, micro_batch=mb)
    inflights = [int(v) for v in args.inflight.split(",")]
    for inflight in inflights:  # warm-up
        scheduled_seconds(early, images[:256], inflight, args.max_batch)
        scheduled_seconds(full, images[:256], inflight, args.max_batch)
    ratios: dict[str, list[float]] = {}
    for r in range(args.rounds):
        line = []
        for inflight in inflights:
            pair = [scheduled_seconds(runner, images, inflight, args.max_batch) for runner in (full, early)]
            ratios.setdefault(f"scheduler, {inflight} in flight", []).append(pair[0] / pair[1])
            line.append(f"scheduler {inflight} in flight: full {pair[0]:.3f} s, early {pair[1]:.3f} s")
        for batch in (64, 256):
            pair = [offline[kind](batch).seconds for kind in ("full", "early")]
            ratios.setdefault(f"offline, batch {batch}", []).append(pair[0] / pair[1])
            line.append(f"offline batch {batch}: full {pair[0]:.3f} s, early {pair[1]:.3f} s")
        print(f"round {r + 1}: " + "; ".join(line), flush=True)
    print("full network time / early exit time (the median of the rounds; each round's runs back to back):")
    for name, values in ratios.items():
        print(f"  {name:28s} {np.median(values):.2f}x  ({', '.join(f'{v:.2f}' for v in values)})")

    cpu, wall = loop_cpu_per_request(blobs, args.requests, 32)
    print(f"HTTP app on a free model, 32 requests in flight: event loop {1e6 * cpu:.0f} us of CPU per request "
          f"({1e6 * wall:.0f} us wall)")
    pixels = {blob: images[i:i + 1] for i, blob in enumerate(blobs)}
    decode = server.decode_images
    server.decode_images = lambda found, shape, names=None: pixels[found[0]].copy()
    try:
        cpu_looked_up, wall_looked_up = loop_cpu_per_request(blobs, args.requests, 32)
    finally:
        server.decode_images = decode
    t = time.perf_counter()
    for blob in blobs:
        decode_images([blob], (3, 32, 32))
    alone = (time.perf_counter() - t) / len(blobs)
    print(f"  the same with decoding replaced by a look-up: {1e6 * cpu_looked_up:.0f} us of CPU "
          f"({1e6 * wall_looked_up:.0f} us wall): decoding costs the loop {1e6 * (cpu - cpu_looked_up):.0f} us, "
          f"against {1e6 * alone:.1f} us for decoding alone in one thread")


if __name__ == "__main__":
    main()
