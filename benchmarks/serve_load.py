"""Does serving keep early exit's gain? An open-loop load test of `exitwise serve`, measured in one run.

    python benchmarks/serve_load.py [--model b-resnet11] [--seconds 10] [--rates 0.3,0.5,0.7,1,1.5,2,2.5,3]
    python benchmarks/serve_load.py --images 200 --seconds 1 --rates 0.5,1 --sequential 10 --offline-images 256  # smoke

Three servers of the same model, each a separate `exitwise serve` process on 127.0.0.1 (all started at once, loaded
one at a time):
(a) the full network (--no-early-exit) with the same stage-level dynamic batching, (b) early exit (the card's
calibrated setting, --schedule as given; (b') the same with each of --also-schedules, to choose the default
rule), (c) early exit with request-level batching (a batch runs all its
stages together, as the offline runtime does, and is answered when it is done). All three run in the precision
and micro-batch measured once here, so they differ only in what is compared.

The client (this process, on uvloop where installed) sends CIFAR-10 test images as JPEG bytes to /v1/predict at
Poisson arrival times (fixed seed), open loop: a request is sent at its time whatever the answers before it, over a
pool of keep-alive connections (at most 2,000 open; a request waiting for one has the wait in its latency, which
counts from the time it was due; 64 are open before a run's clock starts, and the client's heap is frozen then, so
its own garbage collection, 50-60 ms beside torch and the models, does not pause it mid-run). Rates are multiples of
(a)'s capacity: its throughput with --concurrency requests always in flight (default 256: early exit's stage calls
then run 45-64 rows at --max-batch 64), the best of --repeats rounds (in a round every server runs back to back, the
order alternating from one round to the next). Per server and rate: achieved throughput, p50/p95/p99 latency of the
answered requests, refusals (503/504), accuracy of the answers, mean batch size per stage (from /metrics) and the
client's own CPU time (it shares the machine's cores with the server). Printed at the end:
* the highest tested rate each server sustains (every request answered, p99 under 100 ms);
* the p50 and p99 ratios (a)/(b) at the rate nearest 70% of (a)'s capacity;
* the served throughput ratio (b)/(a) beside the offline ratio at batch 256 (`EarlyExitModel.run` vs
  `run_backbone`, same precision and micro-batch) measured in this run, and their quotient (target >= 0.9). Each is
  the median over --repeats rounds of the ratio of two runs back to back: the VM's speed drifts by 10-20% over
  minutes, and a pair run back to back sees one speed (best/best, the ratio of the best runs, is printed beside);
  then the quotient round by round: each capacity round's served ratio over an offline pair run right after it
  (the servers idle), their median, so that the two sides of the target see the same minutes of the VM;
  then the front's CPU per request (event loop and client, alike for both networks) beside what the target allows
  it, from the servers' CPU accounting at capacity (the rest taken as the stages');
  then the offline ratio again at the batch (b)'s first stage ran at capacity: early exit gains less at small
  batches (benchmarks/batch_ratio.py), and a server's batches are what is waiting;
* overload: (b) as users start it (default --max-queue and --timeout-ms) at --overload times its capacity:
  answered, refused (503/504) and the answered requests' latency;
* the server's overhead at batch 1: sequential single-image requests to (b) in blocks of 20, each block's mean latency
  minus `EarlyExitModel.run`'s time per image at batch 1 on the same images, run right after it (the pair sees one
  machine speed); the mean over blocks in each of --repeats rounds, their median (target <= 1 ms).
Timings are only meaningful on a quiet machine: pause other work first.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from exitwise.allocator import keep_freed_memory
from exitwise.data import ImageSet
from exitwise.deploy.oip import decode_images
from exitwise.deploy.server import settle_heap
from exitwise.images import read_tar
from exitwise.device import machine, machine_load
from exitwise.runtime import run_backbone, run_early_exit, warm_up
from exitwise.serve_torch import load_early_exit
from exitwise.tune import tune

SHARED = Path(__file__).resolve().parents[2] / "shared"
SRC = Path(__file__).resolve().parents[1] / "src"
P99_LIMIT = 0.1
SERVED_TARGET = 0.9  # the target for served / offline


def test_jpegs(archive: Path, n: int, seed: int = 0) -> tuple[list[bytes], np.ndarray, tuple[str, ...]]:
    """n CIFAR-10 test images (a seeded sample) as their JPEG bytes, their labels and the class names."""
    files = read_tar(archive)
    names = sorted(name for name in files.names if name.startswith("test/"))
    classes = tuple(sorted({name.split("/")[1] for name in names}))
    pick = [names[i] for i in np.random.default_rng(seed).permutation(len(names))[:n]]
    return [files.read(name) for name in pick], np.array([classes.index(name.split("/")[1]) for name in pick]), classes


class Server:
    """`exitwise serve ARGS --port 0` in its own process, until `stop` (SIGTERM)."""

    def __init__(self, args: list[str]):
        code = "import sys\nfrom exitwise.cli import main\nsys.exit(main(sys.argv[1:]))"
        self.process = subprocess.Popen([sys.executable, "-c", code, "serve", *args, "--port", "0"],
                                        stdout=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONPATH": str(SRC)})
        line = self.process.stdout.readline()
        self.serving = line.strip()  # "exitwise: serving NAME (PLATFORM, PRECISION, micro-batch N) ... on URL"
        if " on http://" not in line and " on https://" not in line:
            self.process.kill()
            raise SystemExit(f"server did not start: {line!r}")
        scheme, address = line.rsplit(" on ", 1)[1].strip().split("://")
        host, port = address.rsplit(":", 1)
        self.host, self.port = host, int(port)
        if scheme == "https":  # the client trusts the server's own certificate (--ssl-certfile)
            TLS[self.host, self.port] = ssl.create_default_context(cafile=args[args.index("--ssl-certfile") + 1])

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by its full name (with labels)."""
        status, body = run_async(_one_request(self.host, self.port, b"GET", b"/metrics", b""))
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds the server used so far: all its threads, and its main threads (the event loops); with
        `--processes N`, its server processes' too (its own main thread only supervises)."""
        def used(stat: str) -> float:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        pid = self.process.pid
        pids = [pid] + [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        return (sum(used(f"/proc/{p}/stat") for p in pids),
                sum(used(f"/proc/{p}/task/{p}/stat") for p in pids))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    length = next(int(v) for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l) if k.lower() == "content-length")
    return status, await reader.readexactly(length)


def _request(method: bytes, path: bytes, body: bytes, content_type: bytes = b"image/jpeg") -> bytes:
    return (method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: " + content_type +
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


TLS: dict[tuple[str, int], ssl.SSLContext] = {}  # servers reached over TLS (`--ssl-certfile`), by address


def _connect(host: str, port: int):
    """(reader, writer) of a new connection to the server at host:port, over TLS where it serves https."""
    return asyncio.open_connection(host, port, ssl=TLS.get((host, port)))


async def _one_request(host: str, port: int, method: bytes, path: bytes, body: bytes) -> tuple[int, bytes]:
    reader, writer = await _connect(host, port)
    writer.write(_request(method, path, body))
    result = await _read_response(reader)
    writer.close()
    return result


def run_async(coroutine):
    """The client's event loop: uvloop where installed (uvicorn[standard] brings it; less CPU per request taken
    from the server's cores), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


MAX_CONNECTIONS = 2000  # open at once at most: past it a request waits for one (its wait counts in its latency)
OPEN_LOOP_CONNECTIONS = 64  # kept-alive connections open before an open-loop run starts (as a running service's are);
# more open when needed, in the requests' time


class Pool:
    """Keep-alive connections to the server; one request in flight per connection, at most `MAX_CONNECTIONS`; every
    body posted to /v1/predict as `content_type` (one JPEG; or a multipart form of several, serve_ab)."""

    def __init__(self, host: str, port: int, content_type: bytes = b"image/jpeg"):
        self.host, self.port, self.free, self.content_type = host, port, [], content_type
        self.limit = asyncio.Semaphore(MAX_CONNECTIONS)

    async def open(self, n: int) -> None:
        """`n` connections opened now, so a timed run does not start with the server accepting them."""
        self.free += await asyncio.gather(*(_connect(self.host, self.port) for _ in range(n)))

    async def post(self, body: bytes) -> tuple[int, bytes]:
        async with self.limit:
            return await self._post(body)

    async def _post(self, body: bytes) -> tuple[int, bytes]:
        if self.free:  # a kept-alive connection, unless the server closed it while it sat idle (uvicorn: after 5 s)
            reader, writer = self.free.pop()
            writer.write(_request(b"POST", b"/v1/predict", body, self.content_type))
            try:
                status, answer = await _read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
            else:
                self.free.append((reader, writer))
                return status, answer
        reader, writer = await _connect(self.host, self.port)
        writer.write(_request(b"POST", b"/v1/predict", body, self.content_type))
        status, answer = await _read_response(reader)
        self.free.append((reader, writer))
        return status, answer


async def _load(host: str, port: int, blobs: list[bytes], arrivals: np.ndarray | None, concurrency: int,
                seconds: float, content_type: bytes = b"image/jpeg") -> list[tuple[int, float, int | None]]:
    """(status, latency, predicted class of its first image) per request: open loop at `arrivals` (seconds from the
    start), or closed loop with `concurrency` requests always in flight for `seconds`."""
    pool, results = Pool(host, port, content_type), []
    await pool.open(concurrency or OPEN_LOOP_CONNECTIONS)
    settle_heap()  # this process holds torch and models (the offline runs): a full collection walking them stops
    # the client for 50-60 ms, which the requests due meanwhile would count as the server's latency

    async def one(i: int, at: float) -> None:
        sent = time.perf_counter() if arrivals is None else start + at  # open loop: from the time it was due
        status, body = await pool.post(blobs[i % len(blobs)])
        predicted = json.loads(body)["predictions"][0]["class_index"] if status == 200 else None
        results.append((i, status, time.perf_counter() - sent, predicted))

    if arrivals is not None:  # each request started at its time (not thousands of waiting tasks made at once, which
        tasks, start = [], time.perf_counter()  # would hold the first ones back by the time it takes to make them)
        for i, at in enumerate(arrivals):
            if start + at > time.perf_counter():
                await asyncio.sleep(start + at - time.perf_counter())
            tasks.append(asyncio.ensure_future(one(i, at)))
        await asyncio.gather(*tasks)
    else:
        counter, start = iter(range(10**9)), time.perf_counter()

        async def worker() -> None:
            while time.perf_counter() - start < seconds:
                await one(next(counter), 0.0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sorted(results)


async def _sequential(host: str, port: int, blobs: list[bytes], pool: Pool | None = None) -> float:
    """Seconds for `blobs` sent one at a time over one keep-alive connection (`pool`'s, else a new one), each
    answered before the next."""
    pool = pool or Pool(host, port)
    start = time.perf_counter()
    for blob in blobs:
        status, _ = await pool.post(blob)
        if status != 200:
            raise SystemExit(f"a sequential request got {status}")
    return time.perf_counter() - start


BLOCK = 20  # sequential requests per block of the batch-1 overhead (about 40 ms): its offline pair runs right after


async def batch1_overhead(server: Server, model, network, micro_batch: int, blobs: list[bytes],
                          data: ImageSet) -> list[float]:
    """The server's overhead at batch 1, paired: `blobs` in blocks of BLOCK sequential requests over one keep-alive
    connection, each block followed at once by `EarlyExitModel.run`'s loop (`run_early_exit`, batch 1) on the same
    images decoded (`data`, in `blobs`' order); per block, its mean seconds per request less the offline run's per
    image. The VM's speed drifts by tens of percent within minutes (docs/serve.md); a block and its pair see one."""
    pool, out, block = Pool(server.host, server.port), [], min(BLOCK, len(blobs))
    for start in range(0, len(blobs) - block + 1, block):
        served = await _sequential(server.host, server.port, blobs[start:start + block], pool) / block
        one = data.subset(torch.arange(start, start + block))
        out.append(served - run_early_exit(network, one, model.thresholds, model.policy, 1,
                                           micro_batch=micro_batch).seconds / block)
    return out


def run_load(server: Server, blobs, labels, rate: float | None, seconds: float, concurrency: int, seed: int,
             content_type: bytes = b"image/jpeg") -> dict:
    """One load run against `server`: open loop at `rate` per second, or closed loop (rate None). `labels[i]`: the
    class of body i's (first) image."""
    arrivals = None
    if rate is not None:
        rng = np.random.default_rng(seed)
        arrivals = np.cumsum(rng.exponential(1 / rate, int(rate * seconds * 1.2) + 10))
        arrivals = arrivals[arrivals < seconds]
    before, cpu0, wall0, server0 = server.metrics(), time.process_time(), time.perf_counter(), server.cpu_seconds()
    results = run_async(_load(server.host, server.port, blobs, arrivals, concurrency, seconds, content_type))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    server_cpu, loop_cpu = (b - a for a, b in zip(server0, server.cpu_seconds()))
    after = server.metrics()
    ok = [(i, lat, p) for i, s, lat, p in results if s == 200]
    latencies = np.array([lat for _, lat, _ in ok]) if ok else np.array([np.inf])
    batches = {}
    for k in range(8):
        count = after.get(f'exitwise_batch_size_count{{stage="{k}"}}', 0) - before.get(
            f'exitwise_batch_size_count{{stage="{k}"}}', 0)
        total = after.get(f'exitwise_batch_size_sum{{stage="{k}"}}', 0) - before.get(
            f'exitwise_batch_size_sum{{stage="{k}"}}', 0)
        if count:
            batches[k] = total / count
    statuses = {code: sum(1 for _, c, _, _ in results if c == code) for code in sorted({c for _, c, _, _ in results})}
    return {"rate": rate, "offered": None if arrivals is None else len(arrivals), "statuses": statuses,
            "requests": len(results), "answered": len(ok), "refused": len(results) - len(ok),
            "throughput": len(ok) / wall, "p50": float(np.percentile(latencies, 50)),
            "p95": float(np.percentile(latencies, 95)), "p99": float(np.percentile(latencies, 99)),
            "accuracy": float(np.mean([p == labels[i % len(labels)] for i, _, p in ok])) if ok else 0.0,
            "batches": batches, "client_cpu_share": cpu / wall, "client_cpu_per_request": cpu / max(len(results), 1),
            "server_cpu_per_request": server_cpu / max(len(results), 1),
            "loop_cpu_per_request": loop_cpu / max(len(results), 1)}


def setup(archive: Path, n: int, seed: int, model_name: str, precision: str, offline_images: int):
    """n test images as JPEG bytes and their labels, the model with the precision and micro-batch `tune` measures on
    those images decoded, and `offline_images` of them decoded (repeated as needed) for the offline runs."""
    blobs, labels, classes = test_jpegs(archive, n, seed)
    data = ImageSet(torch.from_numpy(decode_images(blobs, (3, 32, 32))), torch.from_numpy(labels), classes)
    model = load_early_exit(model=model_name)
    tuned = tune(model.network, data, precision)
    reps = -(-offline_images // len(data))
    big = ImageSet(data.images.repeat(reps, 1, 1, 1)[:offline_images], data.labels.repeat(reps)[:offline_images],
                   classes)
    return blobs, labels, model, tuned, big


def offline(model, network, micro_batch: int, data: ImageSet, rounds: int, batch_size: int = 256) -> dict:
    """Offline, same precision and micro-batch: `batch_size` seconds of early exit and of the full network, the two
    back to back in each of `rounds` rounds (the order alternating); the ratio is the median of the rounds' ratios
    (each round's pair sees the same machine speed, which drifts over minutes)."""
    warm_up(network, data, micro_batch=micro_batch)
    early, full = [], []
    for r in range(rounds):
        for run in ("early", "full") if r % 2 == 0 else ("full", "early"):
            if run == "early":
                early.append(run_early_exit(network, data, model.thresholds, model.policy, batch_size,
                                            micro_batch=micro_batch).seconds)
            else:
                full.append(run_backbone(network, data, batch_size, micro_batch=micro_batch).seconds)
    ratios = [f / e for f, e in zip(full, early)]
    return {"early_s": min(early), "full_s": min(full), "ratios": ratios, "ratio": float(np.median(ratios))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED / "data/cifar10-jpg.tar.gz")
    p.add_argument("--model", default="b-resnet11")
    p.add_argument("--images", type=int, default=2000, help="test images the load cycles through")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each load run")
    p.add_argument("--rates", default="0.3,0.5,0.7,1,1.5,2,2.5,3", help="multiples of the full network's capacity")
    p.add_argument("--concurrency", type=int, default=256, help="requests in flight when measuring capacity (256: "
                   "early exit's stage calls run 45-64 rows at --max-batch 64, and both servers answer more per second "
                   "than at 64; benchmarks/serve_depth.py)")
    p.add_argument("--repeats", type=int, default=5, help="rounds: in each, every server's capacity run back to back "
                   "(the order alternating), and the offline pair; a server's capacity is its best round, the ratios "
                   "the median of the rounds' ratios")
    p.add_argument("--overload", type=float, default=3.0, help="then (b) with the default --max-queue and "
                                                               "--timeout-ms at this multiple of its capacity (0: no)")
    p.add_argument("--sequential", type=int, default=300, help="single-image requests for the batch-1 overhead")
    p.add_argument("--offline-images", type=int, default=2560)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=0.0)
    p.add_argument("--schedule", default="deepest", help="the scheduling rule of (b)")
    p.add_argument("--also-schedules", default="oldest", help="comma-separated rules also run as early-exit servers "
                                                              "(b'), to compare with (b); empty: none")
    p.add_argument("--precision", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-flags", default="", help="more `exitwise serve` flags for every server, e.g. "
                   "'--processes 2' (the batch-1 overhead is then against the offline run on all threads)")
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # a log file fills in line by line, as the run goes
    # the offline reference runs as `exitwise study` runs it, and as the served processes (`exitwise serve`) do:
    # with glibc's malloc thresholds raised (until the fifth session of 2026-12-04 it ran without: early exit up to a
    # quarter slower, docs/serve.md)
    raised = keep_freed_memory()

    blobs, labels, model, tuned, big = setup(args.data, args.images, args.seed, args.model, args.precision,
                                             args.offline_images)
    print(f"{args.model} on {machine().describe()}; {machine_load().describe()}; glibc malloc thresholds raised "
          f"for the offline runs, as the CLI raises them: {'yes' if raised else 'no'}")
    print(f"precision {tuned.precision}, micro-batch {tuned.micro_batch}; setting {model.policy.name} "
          f"{[round(float(t), 4) for t in model.thresholds]}")
    off = offline(model, tuned.network, tuned.micro_batch, big, args.repeats)
    print(f"offline batch 256: full {off['full_s']:.3f} s, early exit {off['early_s']:.3f} s (the best rounds); "
          f"ratio {off['ratio']:.2f}x, the median of the rounds' {', '.join(f'{r:.2f}' for r in off['ratios'])}")

    common = ["--model", args.model, "--precision", tuned.precision, "--micro-batch", str(tuned.micro_batch),
              "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "100000",
              "--timeout-ms", "30000"] + shlex.split(args.server_flags)
    servers = {"a full network": ["--no-early-exit"], "b early exit": ["--schedule", args.schedule],
               "c request-level": ["--schedule", "request-level"]}
    servers.update({f"b' {rule}": ["--schedule", rule] for rule in args.also_schedules.split(",") if rule})
    multiples = [float(r) for r in args.rates.split(",")]
    table, capacity, overhead, running = {}, {}, None, {}
    try:
        for name, extra in servers.items():  # all up at once (an idle server takes no CPU), so capacities alternate
            running[name] = Server(common + extra)
            print(f"{name}: {running[name].serving}")
            run_load(running[name], blobs, labels, None, min(2.0, args.seconds), 8, args.seed)  # warm-up
        rounds = []  # each server's capacity: the best of --repeats rounds; in a round the servers run back to back
        paired = []  # and each round's offline pair right after it (the servers idle): the same minutes' machine
        for r in range(args.repeats):
            order = list(running.items()) if r % 2 == 0 else list(running.items())[::-1]
            rounds.append({name: run_load(server, blobs, labels, None, args.seconds, args.concurrency, args.seed)
                           for name, server in order})
            paired.append(offline(model, tuned.network, tuned.micro_batch, big, 1)["ratio"])
            for name, run in rounds[-1].items():
                if name not in capacity or run["throughput"] > capacity[name]["throughput"]:
                    capacity[name] = run
        b = running["b early exit"]  # batch 1 before the overloaded rates, on the servers as they came up
        run_async(_sequential(b.host, b.port, blobs[:args.sequential]))  # warm-up
        sequential = ImageSet(torch.from_numpy(decode_images(blobs[:args.sequential], (3, 32, 32))),
                              torch.from_numpy(labels[:args.sequential]), model.class_names)
        overhead = [float(np.mean(run_async(batch1_overhead(b, model, tuned.network, tuned.micro_batch,
                                                            blobs[:args.sequential], sequential))))
                    for _ in range(args.repeats)]
        full_capacity = capacity["a full network"]["throughput"]
        for name, server in running.items():
            table[name] = [run_load(server, blobs, labels, m * full_capacity, args.seconds, 0, args.seed + i)
                           for i, m in enumerate(multiples)]
    finally:
        for server in running.values():
            server.stop()
    overload = None
    if args.overload:  # (b) as users start it (the default --max-queue and --timeout-ms) at --overload x its capacity
        server = Server([a for a in common if a not in ("--max-queue", "100000", "--timeout-ms", "30000")]
                        + servers["b early exit"])
        try:
            run_load(server, blobs, labels, None, min(2.0, args.seconds), 8, args.seed)  # warm-up
            overload = run_load(server, blobs, labels, args.overload * capacity["b early exit"]["throughput"],
                                args.seconds, 0, args.seed)
        finally:
            server.stop()

    print(f"\n{'server':18s} {'offered/s':>9s} {'answered/s':>10s} {'refused':>7s} {'p50 ms':>7s} {'p95 ms':>7s} "
          f"{'p99 ms':>7s} {'acc':>6s} {'client CPU':>10s}  mean batch per stage")
    for name, rows in table.items():
        c = capacity[name]
        print(f"{name:18s} {'capacity':>9s} {c['throughput']:10.1f} {c['refused']:7d} {1e3 * c['p50']:7.1f} "
              f"{1e3 * c['p95']:7.1f} {1e3 * c['p99']:7.1f} {c['accuracy']:6.2%} {c['client_cpu_share']:10.0%}  "
              f"{', '.join(f'{b:.1f}' for b in c['batches'].values())}")
        for r in rows:
            print(f"{'':18s} {r['rate']:9.1f} {r['throughput']:10.1f} {r['refused']:7d} {1e3 * r['p50']:7.1f} "
                  f"{1e3 * r['p95']:7.1f} {1e3 * r['p99']:7.1f} {r['accuracy']:6.2%} {r['client_cpu_share']:10.0%}  "
                  f"{', '.join(f'{b:.1f}' for b in r['batches'].values())}")
    print()
    for name, rows in table.items():
        ok = [r["rate"] for r in rows if r["refused"] == 0 and r["p99"] < P99_LIMIT]
        print(f"{name}: highest tested rate with p99 < {1e3 * P99_LIMIT:.0f} ms: "
              f"{f'{max(ok):.1f}/s' if ok else 'none'}")
    at = int(np.argmin([abs(m - 0.7) for m in multiples]))
    a, b = table["a full network"][at], table["b early exit"][at]
    print(f"at {multiples[at]:.0%} of the full network's capacity ({a['rate']:.1f}/s): p50 full/early "
          f"{a['p50'] / b['p50']:.2f}x (target >= 2), p99 full/early {a['p99'] / b['p99']:.2f}x (target >= 1)")
    print("CPU per request at capacity (ms; server: all its threads, of which its event loop; client):")
    for name, c in capacity.items():
        print(f"  {name:18s} server {1e3 * c['server_cpu_per_request']:.3f} (event loop "
              f"{1e3 * c['loop_cpu_per_request']:.3f}), client {1e3 * c['client_cpu_per_request']:.3f}")
    a_cpu, b_cpu = (capacity[n]["server_cpu_per_request"] + capacity[n]["client_cpu_per_request"]
                    for n in ("a full network", "b early exit"))
    a_front, b_front = (capacity[n]["loop_cpu_per_request"] + capacity[n]["client_cpu_per_request"]
                        for n in ("a full network", "b early exit"))  # the front: event loop and client
    a_rest, b_rest = a_cpu - a_front, b_cpu - b_front  # the stages and the worker's Python around them
    print(f"  CPU-bound served ratio (full / early CPU per request, client included): {a_cpu / b_cpu:.2f}x; without "
          f"the event loop's and client's work: {a_rest / b_rest:.2f}x")
    ratios = [r["b early exit"]["throughput"] / r["a full network"]["throughput"] for r in rounds]
    served, best = float(np.median(ratios)), capacity["b early exit"]["throughput"] / full_capacity
    print(f"served throughput ratio early/full {served:.2f}x (the median of the rounds' "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; best/best {best:.2f}x); offline batch-256 ratio "
          f"{off['ratio']:.2f}x; served/offline {served / off['ratio']:.2f} (target >= {SERVED_TARGET})")
    goal = SERVED_TARGET * off["ratio"]  # the front F, alike for both networks, may take at most what keeps
    allowed = (a_rest - goal * b_rest) / (goal - 1)  # (a_rest + F) / (b_rest + F) >= goal
    print(f"the front's CPU per request (event loop and client, alike for both networks): "
          f"{1e3 * (a_front + b_front) / 2:.3f} ms; a CPU-bound ratio of {SERVED_TARGET} x offline ({goal:.2f}x) "
          f"allows it " + (f"{1e3 * allowed:.3f} ms" if allowed > 0 else
                           f"none (the rest of the servers' CPU gives {a_rest / b_rest:.2f}x)"))
    each = [r / o for r, o in zip(ratios, paired)]
    print(f"served/offline round by round, each round's served ratio over the offline pair run right after it: "
          f"median {float(np.median(each)):.2f} ({', '.join(f'{v:.2f}' for v in each)}; the offline pairs "
          f"{', '.join(f'{o:.2f}' for o in paired)})")
    served_batch = max(1, round(capacity["b early exit"]["batches"].get(0, 256)))  # what the server's stage 0 ran
    small = offline(model, tuned.network, tuned.micro_batch, big, args.repeats, served_batch)
    print(f"offline at batch {served_batch} (early exit's mean first-stage batch at capacity): {small['ratio']:.2f}x "
          f"(rounds {', '.join(f'{r:.2f}' for r in small['ratios'])}); served/that {served / small['ratio']:.2f}: "
          f"early exit gains less at small batches, and a server's batches are what is waiting")
    print(f"request-level batching: capacity {capacity['c request-level']['throughput']:.1f}/s vs stage-level "
          f"{capacity['b early exit']['throughput']:.1f}/s ({args.schedule})")
    for name in (n for n in capacity if n.startswith("b'")):
        r, b = table[name][at], table["b early exit"][at]
        print(f"schedule {name[3:]} vs {args.schedule}: capacity {capacity[name]['throughput']:.1f}/s vs "
              f"{capacity['b early exit']['throughput']:.1f}/s; at the 70% rate p50 {1e3 * r['p50']:.1f} vs "
              f"{1e3 * b['p50']:.1f} ms, p99 {1e3 * r['p99']:.1f} vs {1e3 * b['p99']:.1f} ms")
    if overload is not None:
        o = overload
        print(f"overload: (b) with the default --max-queue and --timeout-ms offered {o['rate']:.0f}/s "
              f"({args.overload:g}x its capacity): {o['offered']} requests sent, {o['requests']} got an answer "
              f"(status: count {o['statuses']}), {o['throughput']:.0f}/s predictions; answered p50 "
              f"{1e3 * o['p50']:.1f} ms, p99 {1e3 * o['p99']:.1f} ms")
    print(f"server overhead at batch 1: {1e3 * float(np.median(overhead)):.3f} ms per request over "
          f"EarlyExitModel.run, the median of the rounds' {', '.join(f'{1e3 * o:.3f}' for o in overhead)} (each the "
          f"mean over blocks of {BLOCK} sequential requests over one keep-alive connection, less the offline run of "
          f"the same images at batch 1 right after; target <= 1 ms)")


if __name__ == "__main__":
    main()
