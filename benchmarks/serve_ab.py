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
each, and each capacity as a ratio to the first variant's. The client
(this process, serve_load's) shares the machine's cores with the servers: compare variants within one run only.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load as sl  # noqa: E402

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", help='JSON: {"name": [flags, ...], ...}')
    p.add_argument("--data", type=Path, default=sl.SHARED / "data/cifar10-jpg.tar.gz")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sequential", type=int, default=300)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=64)
    args = p.parse_args()
    variants = json.loads(args.variants)
    blobs, labels, _ = sl.test_jpegs(args.data, 600)
    base = ["--model", "b-resnet11"]  # as users start it: precision and micro-batch measured by each server
    servers = {name: sl.Server(([] if "--export" in flags else base) + flags) for name, flags in variants.items()}
    for name, server in servers.items():
        print(f"{name}: {server.serving}", flush=True)
    sequential, capacity = {}, {}
    try:
        for server in servers.values():  # warm-up
            sl.run_async(sl._sequential(server.host, server.port, blobs[:100]))
        for _ in range(args.rounds):
            for name, server in servers.items():
                ms = 1e3 * sl.run_async(sl._sequential(server.host, server.port, blobs[:args.sequential])) / args.sequential
                sequential[name] = min(sequential.get(name, float("inf")), ms)
                rate = sl.run_load(server, blobs, labels, None, args.seconds, args.concurrency, 0)["throughput"]
                capacity[name] = max(capacity.get(name, 0.0), rate)
    finally:
        for server in servers.values():
            server.stop()
    first = next(iter(variants))
    print(f"best of {args.rounds} rounds, taken in turns; client in this process, {args.concurrency} in flight")
    for name in variants:
        print(f"{name:>16}: batch 1 {sequential[name]:.3f} ms/request, capacity {capacity[name]:.0f}/s "
              f"({capacity[name] / capacity[first]:.2f}x {first})")


if __name__ == "__main__":
    main()
