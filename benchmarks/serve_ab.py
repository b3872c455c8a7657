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
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

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
    sequential, capacity = {name: [] for name in variants}, {name: [] for name in variants}
    try:
        for server in servers.values():  # warm-up
            sl.run_async(sl._sequential(server.host, server.port, blobs[:100]))
        for _ in range(args.rounds):
            for name, server in servers.items():
                ms = 1e3 * sl.run_async(sl._sequential(server.host, server.port, blobs[:args.sequential])) / args.sequential
                sequential[name].append(ms)
                capacity[name].append(sl.run_load(server, blobs, labels, None, args.seconds, args.concurrency,
                                                  0)["throughput"])
    finally:
        for server in servers.values():
            server.stop()
    first = next(iter(variants))
    print(f"best of {args.rounds} rounds, taken in turns; client in this process, {args.concurrency} in flight; "
          f"each ratio to {first}: the median of the rounds' ratios (a round's variants ran within seconds)")
    for name in variants:
        ratios = [c / f for c, f in zip(capacity[name], capacity[first])]
        print(f"{name:>16}: batch 1 {min(sequential[name]):.3f} ms/request, capacity {max(capacity[name]):.0f}/s; "
              f"to {first}: capacity {np.median(ratios):.2f}x (rounds {', '.join(f'{r:.2f}' for r in ratios)}), "
              f"batch 1 {np.median([s / f for s, f in zip(sequential[name], sequential[first])]):.2f}x")


if __name__ == "__main__":
    main()
