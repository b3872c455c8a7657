"""A/B of `exitwise serve` flags, measured in one run: servers started side by side, taken in turns.

    python benchmarks/serve_ab.py '{"w1": ["--workers", "1"], "w2": ["--workers", "2"]}'
    python benchmarks/serve_ab.py '{"onnx": ["--export", "model-onnx/"], "torch": []}' --rounds 5
    python benchmarks/serve_ab.py '{"http": [], "https": ["--ssl-certfile", "cert.pem", "--ssl-keyfile", "key.pem"]}'

Each variant is `exitwise serve` with its flags on 127.0.0.1: `--model b-resnet11` unless the flags give --export,
everything else the product's defaults (each server measures its precision and micro-batch, as users' do; its
serving line, printed first, says what it chose; add --precision/--micro-batch to the flags to fix them). Every
round times each server in turn: --sequential single-image requests over one keep-alive connection (ms per
request), then a closed-loop capacity run (--concurrency requests in flight for --seconds, requests answered per
second); over TLS where the flags give a certificate (the client trusts it). Printed: the best of the rounds for
each, and its ratios to the first variant: the median of the rounds' ratios (a round's runs are seconds apart, while
this VM's speed moves tens of percent within minutes). The client
(this process, serve_load's) shares the machine's cores with the servers: compare variants within one run only.

    python benchmarks/serve_ab.py '{"full": ["--no-early-exit"], "ee": []}' --images-per-request 8 --offline

`--images-per-request N` posts N JPEGs per request (a multipart form, as `curl -F` sends several files; the
capacity is then in images per second), so the server's work per request is shared by N images. `--offline` runs
the offline batch-256 pair (serve_load's, b-resnet11 in the precision and micro-batch measured here) right after
each round and prints each ratio to the first variant also over that round's offline ratio: with a full network
first and early exit second, serve_load's served/offline quotient, round by round.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load as sl  # noqa: E402

from exitwise.allocator import keep_freed_memory  # noqa: E402

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", help='JSON: {"name": [flags, ...], ...}')
    p.add_argument("--data", type=Path, default=sl.SHARED / "data/cifar10-jpg.tar.gz")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sequential", type=int, default=300)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--offline", action="store_true", help="the offline batch-256 ratio after each round")
    args = p.parse_args()
    variants = json.loads(args.variants)
    if args.offline:
        keep_freed_memory()  # as serve_load's offline reference and the CLI run
        blobs, labels, model, tuned, big = sl.setup(args.data, 600, 0, "b-resnet11", "auto", 2560)
    else:
        blobs, labels, _ = sl.test_jpegs(args.data, 600)
    n = args.images_per_request
    content_type = b"image/jpeg" if n == 1 else b"multipart/form-data; boundary=" + BOUNDARY
    bodies = blobs if n == 1 else [multipart([blobs[(i + j) % len(blobs)] for j in range(n)])
                                   for i in range(0, len(blobs), n)]
    labels = labels if n == 1 else labels[::n]  # each body's first image's
    base = ["--model", "b-resnet11"]  # as users start it: precision and micro-batch measured by each server
    servers = {name: sl.Server(([] if "--export" in flags else base) + flags) for name, flags in variants.items()}
    for name, server in servers.items():
        print(f"{name}: {server.serving}", flush=True)
    sequential, capacity, paired = {name: [] for name in variants}, {name: [] for name in variants}, []

    def one_by_one(server, count: int) -> float:
        pool = sl.Pool(server.host, server.port, content_type)
        return sl.run_async(sl._sequential(server.host, server.port, bodies[:count], pool))

    try:
        for server in servers.values():  # warm-up
            one_by_one(server, 100)
        for _ in range(args.rounds):
            for name, server in servers.items():
                sequential[name].append(1e3 * one_by_one(server, args.sequential) / min(args.sequential, len(bodies)))
                capacity[name].append(n * sl.run_load(server, bodies, labels, None, args.seconds, args.concurrency,
                                                      0, content_type)["throughput"])
            if args.offline:  # right after the round, the servers idle
                paired.append(sl.offline(model, tuned.network, tuned.micro_batch, big, 1)["ratio"])
    finally:
        for server in servers.values():
            server.stop()
    first = next(iter(variants))
    print(f"best of {args.rounds} rounds, taken in turns; client in this process, {args.concurrency} in flight, "
          f"{n} image(s) per request; each ratio to {first}: the median of the rounds' ratios (a round's variants "
          f"ran within seconds)")
    if args.offline:
        print(f"offline batch-256 ratio after each round ({tuned.precision}, micro-batch {tuned.micro_batch}): "
              f"{', '.join(f'{o:.2f}' for o in paired)}")
    for name in variants:
        ratios = [c / f for c, f in zip(capacity[name], capacity[first])]
        print(f"{name:>16}: batch 1 {min(sequential[name]):.3f} ms/request, capacity {max(capacity[name]):.0f} "
              f"images/s; to {first}: capacity {np.median(ratios):.2f}x (rounds "
              f"{', '.join(f'{r:.2f}' for r in ratios)}), batch 1 "
              f"{np.median([s / f for s, f in zip(sequential[name], sequential[first])]):.2f}x")
        if args.offline and name != first:
            over = [r / o for r, o in zip(ratios, paired)]
            print(f"{'':>16}  that ratio over the round's offline ratio: median {np.median(over):.2f} (rounds "
                  f"{', '.join(f'{v:.2f}' for v in over)})")


BOUNDARY = b"exitwise-serve-ab"


def multipart(blobs: list[bytes]) -> bytes:
    """A multipart/form-data body of `blobs` as JPEG files (field f), as `curl -F f=@a.jpg -F f=@b.jpg` sends them."""
    parts = [b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="f"; filename="' + b"%d.jpg" % i +
             b'"\r\nContent-Type: image/jpeg\r\n\r\n' + blob + b"\r\n" for i, blob in enumerate(blobs)]
    return b"".join(parts) + b"--" + BOUNDARY + b"--\r\n"


if __name__ == "__main__":
    main()
