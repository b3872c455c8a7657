"""An emulated network link for the tier benchmarks and tests: a TCP relay on 127.0.0.1 that delays every byte by
half the round-trip time in each direction and sends each direction's bytes at the link's rate; and
`ServeProcess`, one `exitwise serve` tier in a process of its own.

This machine's kernel has no `netem` qdisc, so the delay is added in user space. Test and benchmark tooling, not
product: bounded in lifetime (`max_seconds`), listening on 127.0.0.1 only, on a port the OS picks.

    with LinkRelay(target_port, mbps=20, rtt_ms=40) as relay:
        ... connect to 127.0.0.1:relay.port instead of target_port ...
"""
from __future__ import annotations

import asyncio
import os
import select
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

CHUNK = 16 * 1024  # bytes read at once


class _Direction:
    """One direction of one connection: chunks wait out the one-way delay, then go over a serial line of the rate
    (each byte takes 8 / rate seconds, one after another: no burst), in order."""

    def __init__(self, delay: float, bytes_per_second: float | None):
        self.delay, self.rate = delay, bytes_per_second
        self.queue: asyncio.Queue = asyncio.Queue()
        self.free_at = time.monotonic()  # when the line has sent what it was given

    async def pace(self, n: int) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        self.free_at = max(self.free_at, now) + n / self.rate
        await asyncio.sleep(self.free_at - now)

    async def read(self, reader: asyncio.StreamReader) -> None:
        try:
            while data := await reader.read(CHUNK):
                self.queue.put_nowait((time.monotonic() + self.delay, data))
        except (ConnectionError, OSError):
            pass
        self.queue.put_nowait((time.monotonic() + self.delay, b""))

    async def write(self, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                due, data = await self.queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    break
                await self.pace(len(data))
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


class LinkRelay:
    """Relays 127.0.0.1:`port` to `target_host`:`target_port` (127.0.0.1, or a `NetnsLink`'s address) with
    `rtt_ms` of added round trip and at most `mbps` Mbit/s (10^6 bits) each way (None: no cap), in a thread of its
    own, for at most `max_seconds`."""

    def __init__(self, target_port: int, *, mbps: float | None = None, rtt_ms: float = 0.0,
                 max_seconds: float = 600.0, target_host: str = "127.0.0.1"):
        self.target_port, self.target_host, self.delay = target_port, target_host, rtt_ms / 2000
        self.rate = None if mbps is None else mbps * 1e6 / 8
        self.max_seconds = max_seconds
        self.port = 0
        self.bytes_forwarded = 0  # client -> target, the traffic a tier sends on
        self.bytes_returned = 0   # target -> client, the answers
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        up, down = _Direction(self.delay, self.rate), _Direction(self.delay, self.rate)
        try:
            await asyncio.gather(up.read(_Counting(reader, self, "bytes_forwarded")), up.write(target_writer),
                                 down.read(_Counting(target_reader, self, "bytes_returned")), down.write(writer))
        except asyncio.CancelledError:  # the relay stops: its connections end with it
            pass

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await asyncio.wait_for(self._stop.wait(), self.max_seconds)
        except asyncio.TimeoutError:
            pass
        server.close()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()

    def start(self) -> LinkRelay:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the link relay did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def __enter__(self) -> LinkRelay:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Counting:
    """A reader that adds what it reads to the relay's counter `field`."""

    def __init__(self, reader: asyncio.StreamReader, relay: LinkRelay, field: str):
        self.reader, self.relay, self.field = reader, relay, field

    async def read(self, n: int) -> bytes:
        data = await self.reader.read(n)
        setattr(self.relay, self.field, getattr(self.relay, self.field) + len(data))
        return data


class CpuLimit:
    """A slower machine, emulated: a cgroup (v1 `cpu` controller, or v2 with `cpu`) this process creates, whose
    processes get 1 ms of CPU (the least quota the kernel takes) in every 1 / `share` ms, so work of a few
    milliseconds or more runs about 1 / `share` times slower, as on a slower CPU, instead of in full-speed bursts
    (shorter work still can: time it as a sustained run, `measure.measure_stages`). `cpu`: also pin it to that one CPU
    (`taskset`), a single-core device whose threads share the one core. `command(argv)` starts argv inside it.
    Needs root; `available()` says whether this machine allows it."""

    V1, V2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
    QUOTA_US = 1_000

    def __init__(self, share: float, cpu: int | None = None):
        self.share, self.cpu = share, cpu
        name = f"exitwise-bench-{os.getpid()}"
        if (self.V1 / "cpu.cfs_quota_us").exists():
            self.path = self.V1 / name
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text(str(round(self.QUOTA_US / share)))
            (self.path / "cpu.cfs_quota_us").write_text(str(self.QUOTA_US))
        else:
            self.path = self.V2 / name
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{self.QUOTA_US} {round(self.QUOTA_US / share)}")

    @classmethod
    def available(cls) -> bool:
        v2 = (cls.V2 / "cgroup.controllers").exists() and "cpu" in (cls.V2 / "cgroup.controllers").read_text()
        return os.geteuid() == 0 and ((cls.V1 / "cpu.cfs_quota_us").exists() or v2)

    def command(self, argv: list[str]) -> list[str]:
        pin = pinned(self.cpu)
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path), *pin, *argv]

    def close(self) -> None:
        try:
            self.path.rmdir()  # its processes have ended
        except OSError:
            pass


class Stretch:
    """A slower machine, emulated steadily: its processes pinned to `cpu` (taskset), and every ONNX Runtime session
    call in them (a stage or a head: what `exitwise serve --export` and `plan --measure` run) followed by a sleep of
    (1 / `share` - 1) times its duration (`stretch_onnxruntime`), so the model's work takes 1 / `share` of its time,
    call by call. The rest of a tier's work (HTTP, decoding, forwarding) runs at full speed. Where `CpuLimit`'s quota
    lets work run in full-speed bursts of 1 ms and spill into the next period, which made a fresh process's speed
    move by 10% and more (docs/tiers.md), this one scales each call as a uniformly slower CPU would.
    `paced`: instead, each call padded to 1 / `share` times its graph's seconds per row measured once at the start
    (`pace_costs`, {file name: seconds}) times its rows (`pace_onnxruntime`): the model's work at a fixed pace, as
    on a machine of its own, whatever this VM's speed does later (it moved 2x within tens of seconds here, and a
    stretched device with it). `command(argv)` starts argv, a `python -m exitwise ARGS` (inside a `NetnsLink`'s
    command or not), so."""

    def __init__(self, share: float, cpu: int | None = None, paced: dict[str, float] | None = None):
        self.share, self.cpu, self.paced = share, cpu, paced

    def command(self, argv: list[str]) -> list[str]:
        i = argv.index("-m")  # argv[i - 1] is the interpreter, argv[i + 1] "exitwise"
        pin = pinned(self.cpu)
        slow = (f"pace_onnxruntime({1 / self.share!r}, {self.paced!r})" if self.paced
                else f"stretch_onnxruntime({1 / self.share - 1!r})")
        code = (f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
                f"from link_relay import pace_onnxruntime, stretch_onnxruntime\n{slow}\n"
                "from exitwise.cli import main\nsys.exit(main(sys.argv[1:]))")
        return [*argv[:i - 1], *pin, argv[i - 1], "-c", code, *argv[i + 2:]]

    def close(self) -> None:
        pass


def _pad_onnxruntime(pad, clock, sleep) -> None:
    """Every `onnxruntime.InferenceSession.run` in this process from now on followed by a sleep of `pad(session,
    input_feed, seconds the call took)` seconds (none when that is below zero)."""
    import onnxruntime
    run = onnxruntime.InferenceSession.run

    def padded(self, output_names, input_feed, *args, **kwargs):
        start = clock()
        out = run(self, output_names, input_feed, *args, **kwargs)
        sleep(max(0.0, pad(self, input_feed, clock() - start)))
        return out

    onnxruntime.InferenceSession.run = padded


def stretch_onnxruntime(factor: float, clock=time.perf_counter, sleep=time.sleep) -> None:
    """Every `onnxruntime.InferenceSession.run` in this process from now on followed by a sleep of `factor` times
    its duration (`Stretch`)."""
    _pad_onnxruntime(lambda session, feed, took: factor * took, clock, sleep)


def pace_onnxruntime(factor: float, seconds_per_row: dict[str, float], clock=time.perf_counter,
                     sleep=time.sleep) -> None:
    """Every `onnxruntime.InferenceSession.run` in this process from now on taking at least `factor` times its rows
    times its graph file's `seconds_per_row` (a sleep after it makes up the rest)."""
    def pad(session, feed, took: float) -> float:
        rows = len(next(iter(feed.values())))
        return factor * rows * seconds_per_row[Path(session._model_path).name] - took

    _pad_onnxruntime(pad, clock, sleep)


def pace_costs(export: str | Path, calls: int = 300) -> dict[str, float]:
    """Each ONNX graph file of `export` (stages and heads): the median seconds of a call on one row of random input,
    on one thread as a server runs it, over `calls` calls after a warm-up, in this process (run it where the device
    runs: `pace_command`)."""
    import numpy as np
    from exitwise.deploy.onnx_runtime import OnnxEarlyExit
    runner, rng, out = OnnxEarlyExit.load(export, threads=1, spin=False), np.random.default_rng(0), {}
    m = runner.manifest
    for graph, session in zip([*m.stages, *m.heads], [*runner.stages, *runner.heads]):
        x = session.get_inputs()[0]  # "x", a dynamic batch
        feed = {x.name: rng.random([1, *x.shape[1:]]).astype(np.float32)}
        for _ in range(20):
            session.run(None, feed)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        out[graph.file] = float(np.median(times))
    return out


def pinned(cpu: int | None) -> list[str]:
    """The command prefix that runs a command on CPU `cpu` only (none: anywhere)."""
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def pace_command(export: str | Path, cpu: int | None) -> tuple[list[str], dict]:
    """`pace_costs(export)` in a fresh interpreter pinned to `cpu`, printing its JSON: (argv, environment)."""
    code = (f"import json, sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
            f"from link_relay import pace_costs\nprint(json.dumps(pace_costs({str(export)!r})))")
    argv, env = exitwise_command()
    return [*pinned(cpu), argv[0], "-c", code], env


class NetnsLink:
    """A network namespace this process creates, joined to this one by a veth pair whose two ends the kernel's
    token bucket (`tbf`) limits to `mbps` Mbit/s each way, with a burst of one full-size packet: the rate in the
    kernel instead of in `LinkRelay` (the kernel here has no `netem`, so the round trip still comes from a relay
    with no rate cap in front). `command(argv)` runs argv inside (a server there listens on `host`). Needs root
    and iproute2; `close()` deletes the namespace and the pair with it. `index`: one of several at once."""

    BURST_BYTES = 1600  # one Ethernet frame (and tbf's least workable burst): a serial line, nearly

    def __init__(self, mbps: float, index: int = 0):
        tag = f"{os.getpid() % 100000}{index}"
        self.name, outer, inner = f"exw{tag}", f"exw{tag}a", f"exw{tag}b"
        net = f"10.{200 + index % 50}.{os.getpid() % 250}"
        self.host, self.mbps = f"{net}.2", mbps
        tbf = ["root", "tbf", "rate", f"{mbps * 1000:g}kbit", "burst", str(self.BURST_BYTES), "latency", "2s"]
        steps = [["ip", "netns", "add", self.name],
                 ["ip", "link", "add", outer, "type", "veth", "peer", "name", inner],
                 ["ip", "link", "set", inner, "netns", self.name],
                 ["ip", "addr", "add", f"{net}.1/30", "dev", outer], ["ip", "link", "set", outer, "up"],
                 ["ip", "-n", self.name, "addr", "add", f"{self.host}/30", "dev", inner],
                 ["ip", "-n", self.name, "link", "set", inner, "up"], ["ip", "-n", self.name, "link", "set", "lo", "up"],
                 ["tc", "qdisc", "add", "dev", outer, *tbf],
                 ["ip", "netns", "exec", self.name, "tc", "qdisc", "add", "dev", inner, *tbf]]
        try:
            for step in steps:
                subprocess.run(step, check=True, capture_output=True, text=True, timeout=30)
        except subprocess.CalledProcessError as e:
            self.close()
            raise RuntimeError(f"{' '.join(e.cmd)}: {e.stderr.strip()}") from None

    @staticmethod
    def available() -> bool:
        return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)


def exitwise_command(*args: str) -> tuple[list[str], dict]:
    """`python -m exitwise *args` with this checkout's src/ first on the path: (argv, environment)."""
    src = Path(__file__).resolve().parents[1] / "src"
    return [sys.executable, "-m", "exitwise", *args], {**os.environ, "PYTHONPATH": str(src)}


class ServeProcess:
    """`exitwise serve --export EXPORT --port PORT *args` in a process of its own (port 0: the OS picks), ready
    (answering /v2/health/ready) when constructed, within `start_seconds`; `stop()` sends SIGTERM. `limit`: run it
    inside a `CpuLimit` (an emulated slower machine), `netns`: inside a `NetnsLink`'s namespace, listening on its
    address. `export` None: no --export (a relay, or --model/--from). `context`: how to reach an https server (its
    readiness is asked there). After `stop()`, `log` is what it wrote to stderr."""

    def __init__(self, export: str | Path | None, *args: str, port: int = 0, start_seconds: float = 60.0,
                 limit: CpuLimit | None = None, netns: NetnsLink | None = None,
                 context: ssl.SSLContext | None = None):
        model = ["--export", str(export)] if export is not None else []
        host = ["--host", netns.host] if netns else []
        argv, env = exitwise_command("serve", *model, *host, "--port", str(port), *args)
        argv = netns.command(argv) if netns else argv
        self.proc = subprocess.Popen(limit.command(argv) if limit else argv, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        deadline, line = time.monotonic() + start_seconds, ""
        while "serving" not in line:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready or self.proc.poll() is not None:
                why = self.proc.stderr.read()[-2000:] if self.proc.poll() is not None else "no answer in time"
                self.stop()
                raise RuntimeError(f"the tier did not start: {why}")
            line = self.proc.stdout.readline()
        self.url = line.strip().rsplit(" ", 1)[-1]
        self.port = int(self.url.rsplit(":", 1)[-1])
        while True:  # the line comes when the port is bound; ready once it listens
            try:
                urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=5, context=context).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the tier did not get ready within {start_seconds:g} s") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self.proc.stderr.closed:
            self.log = self.proc.stderr.read()  # what the process logged (it has exited: no wait)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()
