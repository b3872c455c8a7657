"""Does the served gain grow with the server's batches? Early exit's served throughput over the full network's
(closed loop, both `exitwise serve`) by requests in flight and --max-batch, beside the offline batch-256 ratio, in
one run.

    python benchmarks/serve_depth.py [--variants 64/64,256/64,256/128,512/128] [--rounds 5] [--seconds 6] \\
        [--server-flags '--processes 2']

Each variant IN_FLIGHT/MAX_BATCH: a full-network and an early-exit server (b-resnet11, the precision and
micro-batch measured here, no waiting), each run closed loop with IN_FLIGHT requests always in flight for --seconds,
the pair back to back (the order alternating from round to round, as the variants' order does); a variant's ratio
is the median of its rounds' ratios. The offline ratio (serve_load.offline) is measured before and after. The
client (serve_load's, in this process) shares the machine's cores with the servers. Run it on a quiet machine.
"""
import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load as sl  # noqa: E402

from exitwise.allocator import keep_freed_memory  # noqa: E402
from exitwise.deploy.server import settle_heap  # noqa: E402
from exitwise.device import machine, machine_load  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=sl.SHARED / "data/cifar10-jpg.tar.gz")
    p.add_argument("--variants", default="64/64,256/64,256/128,512/128", help="IN_FLIGHT/MAX_BATCH,...")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--server-flags", default="", help="more `exitwise serve` flags for every server, e.g. "
                   "'--processes 2'")
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # a log file fills in line by line, as the run goes
    variants = [tuple(int(v) for v in item.split("/")) for item in args.variants.split(",")]
    keep_freed_memory()  # as the CLI does, for the offline runs
    blobs, labels, model, tuned, big = sl.setup(args.data, 2000, 0, "b-resnet11", "auto", 2560)
    print(f"b-resnet11 on {machine().describe()}; {machine_load().describe()}; precision {tuned.precision}, "
          f"micro-batch {tuned.micro_batch}")

    def offline(when: str) -> float:
        off = sl.offline(model, tuned.network, tuned.micro_batch, big, args.rounds)
        print(f"offline batch 256 ratio {when}: {off['ratio']:.2f}x (rounds "
              + ", ".join(f"{r:.2f}" for r in off["ratios"]) + ")")
        return off["ratio"]

    before = offline("before")
    common = ["--model", "b-resnet11", "--precision", tuned.precision, "--micro-batch", str(tuned.micro_batch),
              "--max-wait-ms", "0", "--max-queue", "100000", "--timeout-ms", "30000"] + shlex.split(args.server_flags)
    servers, ratios, best, batches = {}, {v: [] for v in variants}, {}, {}
    try:
        for mb in sorted({mb for _, mb in variants}):
            for kind, extra in (("full", ["--no-early-exit"]), ("early", [])):
                servers[kind, mb] = sl.Server(common + ["--max-batch", str(mb)] + extra)
                sl.run_load(servers[kind, mb], blobs, labels, None, 2.0, 8, 0)  # warm-up
        settle_heap()
        for r in range(args.rounds):
            for conc, mb in variants if r % 2 == 0 else variants[::-1]:
                got = {}
                for kind in ("full", "early") if r % 2 == 0 else ("early", "full"):
                    run = sl.run_load(servers[kind, mb], blobs, labels, None, args.seconds, conc, 0)
                    got[kind] = run["throughput"]
                    best[conc, mb, kind] = max(best.get((conc, mb, kind), 0.0), run["throughput"])
                    batches[conc, mb, kind] = run["batches"]
                ratios[conc, mb].append(got["early"] / got["full"])
    finally:
        for server in servers.values():
            server.stop()
    after = offline("after")
    reference = float(np.median([before, after]))
    for conc, mb in variants:
        ratio = float(np.median(ratios[conc, mb]))
        rows = {k: ", ".join(f"{v:.0f}" for v in batches[conc, mb, k].values()) for k in ("full", "early")}
        print(f"{conc:4d} in flight, max batch {mb:3d}: served {ratio:.2f}x = {ratio / reference:.2f} of offline "
              f"{reference:.2f}x (rounds " + ", ".join(f"{x:.2f}" for x in ratios[conc, mb])
              + f"); best full {best[conc, mb, 'full']:.0f}/s, early {best[conc, mb, 'early']:.0f}/s; rows per "
              f"stage call full {rows['full']}, early {rows['early']}")


if __name__ == "__main__":
    main()
