"""Tiers over emulated links: measured end-to-end latency (p50/p99, mean) and bytes per image of all-cloud (the
device sends every image), all-device, and the planner's choice, with the planner's prediction beside each
(bytes: both ways over the link, the requests with their headers and the answers, as the planner counts them).

Two tiers, "device" and "cloud", both `exitwise serve` processes on this machine, joined by `LinkRelay`
(benchmarks/link_relay.py: the link's RTT and rate in user space, as the kernel has no netem). The device is
emulated as a slower single-core machine: its tier runs pinned to one CPU (the last), and each of its model calls
is padded by a sleep to 1 / `--device-cpu-share` (default 0.25: 4x) of that graph's time per row, measured once at
the start on that CPU (`--device-emulation pace`, the default: a device whose speed holds while this VM's moves);
or each call is followed by a sleep of (1 / share - 1) times its own duration (`stretch`, link_relay.Stretch: the
VM's drift, 2x within tens of seconds on some days, comes along); or (`quota`) it runs in a cgroup limited to that
share of the CPU (1 ms in every 4 ms: link_relay.CpuLimit), whose full-speed bursts and spills made a fresh
process's speed move by 10% and more (docs/tiers.md). Everything else (this client, the relays, the cloud tier)
runs on the other CPUs.
The planner gets each tier's stage times as measured there (`exitwise plan --measure`, batch 1, the device's inside
the same cgroup), its request cost as its clients see it (`measure.measure_request_at`, from this process; both the
median of `--starts` fresh processes; taken again just before each link's placements, as the VM's speed moves over
minutes), and each link's round trip as measured through the relay (its nominal RTT plus the relay's own work).
Clients send one image per request (binary V2 infer) on a keep-alive connection each (as a device application keeps
its connection open), `--concurrency` at a time (default 1); each placement is served by `--starts` fresh sets of
processes (default 6; each tier's costs are the median of as many), the images split among them. With one request
in flight, every placement of a link is up at once in each start and the images go to them in turn, request by
request (a slow spell of the VM falls on them alike); with more, the placements take turns start by start. Before
each start the tiers are measured again (`--measure-in-turns`, the default) and each row is also predicted from
those costs, start by start: the cost model's error without the VM's drift between measuring and serving.

    python benchmarks/tiers.py --study runs/b-resnet11-study --export runs/b-resnet11-onnx \\
        --data-dir ../shared/data/cifar10-jpg.tar.gz --images 1000 --links 1:100,20:40,100:20,1000:5
    python benchmarks/tiers.py --tiny      # smoke run: random-weight digits-convnet, 40 images, one link

Run it alone on a quiet machine: the figures are timings.
"""
from __future__ import annotations

import argparse
import atexit
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from link_relay import CpuLimit, LinkRelay, NetnsLink, ServeProcess, Stretch, exitwise_command, pace_command

from exitwise.deploy.onnx_runtime import OnnxEarlyExit
from exitwise.deploy.measure import measure_request_at, measure_wire
from exitwise.deploy.plan import Link, Tier, candidate, export_shapes, parse_tier, plan, study_costs
from exitwise.deploy.server import settle_heap
from exitwise.study.logits_cache import load_logits


class Client:
    """One client's keep-alive connection to a server at `url` (as a device application keeps its connection open:
    accepting a connection per request would cost the server work a real client does not make it do)."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=120)

    def infer(self, model: str, image: np.ndarray) -> tuple[float, dict]:
        """One image as binary V2 infer; (seconds, the response)."""
        head = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, *image.shape],
                                       "parameters": {"layout": "NHWC", "binary_data_size": image.size}}]}).encode()
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
        start = time.perf_counter()
        self.connection.request("POST", f"/v2/models/{model}/infer", head + image.tobytes(), headers)
        response = self.connection.getresponse()
        body = response.read()
        took = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"the tier answered {response.status}: {body[:200]!r}")
        return took, json.loads(body)

    def classify(self, model: str, image: np.ndarray) -> tuple[float, int, int]:
        """One image: (seconds, the class it was given, 1 if answered degraded else 0)."""
        took, doc = self.infer(model, image)
        out = {o["name"]: o["data"] for o in doc["outputs"]}
        return took, out["class_index"][0], sum(doc.get("parameters", {}).get("degraded", []))

    def close(self) -> None:
        self.connection.close()


def drive(url: str, model: str, images: np.ndarray, concurrency: int,
          warmed=lambda: None) -> tuple[np.ndarray, np.ndarray, int]:
    """Every image once, `concurrency` clients each sending one request at a time on its own keep-alive connection,
    after one untimed request each (`warmed()` is called once all have had theirs): (seconds per image, predicted
    class, degraded count)."""
    settle_heap()  # a full garbage collection would stop the clients mid-request, counted as the tiers' latency
    seconds, classes, degraded, lock, next_i = np.zeros(len(images)), np.zeros(len(images), int), [0], \
        threading.Lock(), [0]
    ready = threading.Barrier(concurrency, action=warmed)

    def worker():
        client = Client(url)
        try:
            client.infer(model, images[0])  # the connection opened, the sessions warm
            ready.wait()
            while True:
                with lock:
                    i, next_i[0] = next_i[0], next_i[0] + 1
                if i >= len(images):
                    return
                seconds[i], classes[i], was_degraded = client.classify(model, images[i])
                with lock:
                    degraded[0] += was_degraded
        finally:
            client.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return seconds, classes, degraded[0]


def measured_tier(name: str, export: Path, model: str, images: np.ndarray, limit: CpuLimit | Stretch | None,
                  starts: int) -> tuple[Tier, float]:
    """A tier with its stage times measured there (`exitwise plan --measure`, inside `limit`) and its request cost
    as its clients see it (`measure.measure_request_at` from this process, outside `limit`, against the whole network
    served inside it, on `images`), each the median over `starts` fresh processes (a process's speed varies from
    one start to the next); and the request cost `plan --measure` gave (its client inside `limit`)."""
    argv, env = exitwise_command("plan", "--measure", "--export", str(export))
    inside = []
    for _ in range(starts):
        out = subprocess.run(limit.command(argv) if limit else argv, env=env, capture_output=True, text=True,
                             check=True)
        inside.append(parse_tier(f"{name}:{out.stdout.strip().splitlines()[-1]}"))
    at_inside = combined_tier(inside)
    stages = at_inside.stage_seconds
    requests = []
    for _ in range(starts):
        served = ServeProcess(export, limit=limit)
        try:
            requests.append(measure_request_at(served.url, model, stages, images))
        finally:
            served.stop()
    print(f"{name}, {starts} starts: stage ms " + "; ".join("/".join(f"{1000 * v:.2f}" for v in t.stage_seconds)
                                                          for t in inside)
          + "; request ms from its clients " + "/".join(f"{1000 * r:.2f}" for r in requests))
    tier = Tier(name, stage_seconds=stages, request_seconds=float(np.median(requests)))
    return tier, at_inside.request_seconds


def combined_tier(measured: Sequence[Tier], weights: np.ndarray | None = None) -> Tier:
    """One tier's measurements (the same tier, several processes) as one: each cost their median, or with
    `weights` their weighted mean."""
    def combine(values: list) -> np.ndarray:
        return np.median(values, axis=0) if weights is None else np.average(values, axis=0, weights=weights)

    return Tier(measured[0].name, stage_seconds=tuple(float(v) for v in combine([t.stage_seconds for t in measured])),
                request_seconds=float(combine([t.request_seconds for t in measured])))


def measure_tiers(export: Path, model: str, images: np.ndarray, limit: CpuLimit | Stretch | None,
                  starts: int) -> tuple[Tier, Tier]:
    """The device (inside `limit`) and the cloud, measured (`measured_tier`, `starts` fresh processes) and printed."""
    (device, device_inside), (cloud, cloud_inside) = (measured_tier("device", export, model, images, limit, starts),
                                                      measured_tier("cloud", export, model, images, None, starts))
    for t, inside in ((device, device_inside), (cloud, cloud_inside)):
        print(f"{t.name}: stage ms per image (plan --measure, batch 1"
              f"{f', in {limit.share:g} of CPU {limit.cpu}' if t.name == 'device' and limit else ''}): "
              + ", ".join(f"{1000 * v:.3f}" for v in t.stage_seconds) + f"; request {1000 * t.request_seconds:.2f} "
              f"from its clients (plan --measure, its client inside: {1000 * inside:.2f})")
    return device, cloud


def link(port: int, mbps: float | None, rtt_ms: float, netns: NetnsLink | None,
         max_seconds: float = 3600) -> LinkRelay:
    """The emulated link to a server on `port`: a relay adding the RTT and the rate, or (`netns`: the server is in
    that namespace) the RTT only, the namespace's tbf giving the rate."""
    return LinkRelay(port, mbps=None if netns else mbps, rtt_ms=rtt_ms, max_seconds=max_seconds,
                     target_host=netns.host if netns else "127.0.0.1").start()


def effective_rtt_ms(export: Path, model: str, image: np.ndarray, mbps: float, rtt_ms: float,
                     netns: NetnsLink | None, requests: int = 30) -> float:
    """The emulated link's round trip as a one-image request meets it: the median request over the link less the
    median one to a server on 127.0.0.1, less its bytes' time at the rate both ways (the relay's own work is in
    the rest); each on one keep-alive connection, as the load is driven (`drive`)."""
    near = ServeProcess(export)
    far = ServeProcess(export, netns=netns) if netns else near
    relay, clients = None, []

    def opened(url: str) -> Client:
        client = Client(url)
        clients.append(client)
        client.infer(model, image)  # the connection opened
        return client

    try:
        direct = opened(near.url)
        direct_s = np.median([direct.infer(model, image)[0] for _ in range(requests)])
        relay = link(far.port, mbps, rtt_ms, netns, 600)
        relayed = opened(f"http://127.0.0.1:{relay.port}")
        up, down = relay.bytes_forwarded, relay.bytes_returned
        relayed_s = np.median([relayed.infer(model, image)[0] for _ in range(requests)])
        per_request = (relay.bytes_forwarded - up + relay.bytes_returned - down) / requests
    finally:
        for client in clients:
            client.close()
        if relay:
            relay.stop()
        for server in {near, far}:
            server.stop()
    return 1000 * (relayed_s - direct_s - per_request * 8 / (mbps * 1e6))


def placement_label(stages) -> str:
    """A placement's stages per tier as text: "0-2/3-3", "-/0-3"."""
    return "/".join(f"{r[0]}-{r[1]}" if r else "-" for r in stages)


def measure_in_turns(placements: list, export: Path, model: str, images: np.ndarray, labels: np.ndarray,
                     mbps: float, rtt_ms: float, concurrency: int, limit: CpuLimit | Stretch | None, netns: NetnsLink | None,
                     starts: int = 1, remeasure=None) -> list[dict]:
    """Each of `placements` ((device stages, cloud stages), wire, send_images) served over the emulated link and
    measured: the images split among `starts` fresh sets of processes per placement, the placements taking turns
    start by start, the order reversed each time (a process's speed varies from one start to the next, and the
    machine's over minutes: a slow spell then falls on every placement, not on one). `remeasure`: called before
    each start's turn (the tiers' costs measured again in the minutes they are served). With one request in flight
    (`concurrency` 1) each start serves every placement at once, its processes all up, and the images go to them in
    turn request by request (`drive_interleaved`): placements that run the same work then measure alike, where
    start-by-start turns had measured them up to 28% apart on a VM whose speed moves within seconds."""
    parts = np.array_split(np.arange(len(images)), starts)
    runs = [[] for _ in placements]
    for s, part in enumerate(parts):
        if remeasure:
            remeasure()
        if concurrency == 1:
            served = []
            try:
                for stages, wire, send_images in placements:
                    served.append(Served(stages, export, mbps, rtt_ms, wire, send_images, limit, netns))
                for j, run in enumerate(drive_interleaved(served, model, images[part])):
                    runs[j].append(run)
            finally:
                for one in served:
                    one.stop()
            continue
        order = list(enumerate(placements))
        for j, (stages, wire, send_images) in order if s % 2 == 0 else order[::-1]:
            runs[j].append(_serve_once(stages, export, model, images[part], mbps, rtt_ms, wire, send_images,
                                       concurrency, limit, netns))
    return [_measured(r, labels) for r in runs]


def _measured(runs: list, labels: np.ndarray) -> dict:
    """One placement's starts ((seconds, classes, degraded, bytes) each), summed up."""
    seconds = np.concatenate([r[0] for r in runs])
    return {"p50_ms": 1000 * float(np.percentile(seconds, 50)), "p99_ms": 1000 * float(np.percentile(seconds, 99)),
            "mean_ms": 1000 * float(seconds.mean()), "bytes_per_image": sum(r[3] for r in runs) / len(labels),
            "degraded": sum(r[2] for r in runs),
            "accuracy": 100 * float((np.concatenate([r[1] for r in runs]) == labels).mean()),
            "starts": len(runs), "mean_ms_per_start": [1000 * float(r[0].mean()) for r in runs]}


class Served:
    """One placement ((device stages, cloud stages), wire, send_images) served by fresh processes: the cloud tier,
    the emulated link to it and the device tier; `url` takes the clients' requests; `crossed()` counts the link's
    bytes both ways, as the planner does (the requests and their answers)."""

    def __init__(self, placement, export: Path, mbps: float | None, rtt_ms: float, wire: str, send_images: bool,
                 limit: CpuLimit | Stretch | None, netns: NetnsLink | None):
        device_stages, cloud_stages = placement
        self.procs, self.relay = [], None
        try:
            if cloud_stages is not None:
                cloud = ServeProcess(export, "--stages", f"{cloud_stages[0]}-{cloud_stages[1]}", "--tier", "cloud",
                                     netns=netns)
                self.procs.append(cloud)
                self.relay = link(cloud.port, mbps, rtt_ms, netns)
            if device_stages is None:
                self.url = f"http://127.0.0.1:{self.relay.port}"  # all-cloud: the device only sends the image
            else:
                extra = ["--next", f"http://127.0.0.1:{self.relay.port}", "--wire", wire] if self.relay else []
                extra += ["--send-images"] if self.relay and send_images else []
                device = ServeProcess(export, "--stages", f"{device_stages[0]}-{device_stages[1]}", "--tier",
                                      "device", *extra, limit=limit)
                self.procs.append(device)
                self.url = device.url
        except BaseException:
            self.stop()
            raise

    def crossed(self) -> int:
        return self.relay.bytes_forwarded + self.relay.bytes_returned if self.relay else 0

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        if self.relay:
            self.relay.stop()


def _serve_once(placement, export: Path, model: str, images: np.ndarray, mbps: float | None, rtt_ms: float,
                wire: str, send_images: bool, concurrency: int, limit: CpuLimit | Stretch | None,
                netns: NetnsLink | None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """`placement` served by fresh processes, `images` driven through it: (seconds, classes, degraded, bytes)."""
    served = Served(placement, export, mbps, rtt_ms, wire, send_images, limit, netns)
    try:
        before = [0]
        seconds, classes, degraded = drive(served.url, model, images, concurrency,
                                           warmed=lambda: before.__setitem__(0, served.crossed()))
        return seconds, classes, degraded, served.crossed() - before[0]
    finally:
        served.stop()


def drive_interleaved(served: list[Served], model: str, images: np.ndarray) -> list[tuple]:
    """Every image through every placement of `served`, one request at a time: image i to each placement in turn
    (the first one rotating), so that the machine's slow spells fall on them alike. (seconds, classes, degraded,
    bytes) per placement, after one untimed request each."""
    settle_heap()
    clients = [Client(s.url) for s in served]
    try:
        for c in clients:
            c.infer(model, images[0])  # the connections opened, the sessions warm
        before = [s.crossed() for s in served]
        n = len(served)
        seconds, classes, degraded = np.zeros((n, len(images))), np.zeros((n, len(images)), int), [0] * n
        for i, image in enumerate(images):
            for j in ((i + r) % n for r in range(n)):
                seconds[j, i], classes[j, i], was_degraded = clients[j].classify(model, image)
                degraded[j] += was_degraded
        return [(seconds[j], classes[j], degraded[j], served[j].crossed() - before[j]) for j in range(n)]
    finally:
        for c in clients:
            c.close()


def whole_test_set(rows: list[dict], export: Path, model: str, images: np.ndarray, labels: np.ndarray,
                   concurrency: int) -> dict:
    """Accuracy and bytes per image on `images` (the whole test set by default) of every placement the plan chose
    and of all-cloud, each served once more by fresh processes over a relay that only counts the bytes (no delay, no
    rate cap, no CPU limit: neither changes an answer or a byte), beside the full network's accuracy (ONNX Runtime,
    every image to the final exit). The timed rows serve fewer images: an accuracy within 0.5 points of the full
    network is a claim about the setting, and 1,000 images are too few to settle a difference that small."""
    full = 100 * float((OnnxEarlyExit.load(export).run_backbone(images).predictions == labels).mean())
    chosen = {}
    for r in rows:
        if r["placement"] in ("plan", "all-cloud"):
            key = (r["stages"], r["wire"], r["send_images"])
            chosen.setdefault(key, []).append(f"{r['placement']} {r['mbps']:g}Mb/{r['rtt_ms']:g}ms")
    print(f"whole test set ({len(labels)} images, untimed, {concurrency} in flight): full network {full:.2f}%")
    out = {"images": len(labels), "full_network_accuracy": full, "placements": []}
    for (stages, wire, send_images), where in chosen.items():
        _, classes, degraded, crossed = _serve_once(stages, export, model, images, None, 0.0, wire, send_images,
                                                    concurrency, None, None)
        accuracy = 100 * float((classes == labels).mean())
        label = placement_label(stages)
        print(f"  {label:>9s} {wire}: accuracy {accuracy:.2f}% ({accuracy - full:+.2f} points against the full "
              f"network), {crossed / len(labels):.0f} B/image over the link, {degraded} degraded; as "
              + ", ".join(where))
        out["placements"].append({"stages": stages, "wire": wire, "send_images": send_images, "accuracy": accuracy,
                                  "bytes_per_image": crossed / len(labels), "degraded": degraded, "rows": where})
    return out


def tiny_setup(folder: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A random-weight digits-convnet 'study' (logits, made-up stage times) and its export; 40 images."""
    import torch

    from exitwise.api import export
    from exitwise.data import load_splits
    from exitwise.early_exit import EarlyExitModel
    from exitwise.models import create_model
    from exitwise.policies import get_policy
    from exitwise.runtime import all_exit_logits, prepare
    from exitwise.study.logits_cache import ExitLogits, save_logits
    from exitwise.study.results import Measurements
    torch.manual_seed(0)
    splits = load_splits("digits", progress=False)
    net, policy = create_model("digits-convnet"), get_policy("entropy")
    run = all_exit_logits(prepare(net), splits.val)
    scores = policy.scores(torch.from_numpy(run.logits)).numpy()
    thresholds = [float(np.quantile(scores[0], 0.3)), float(np.quantile(scores[1], 0.5))]
    EarlyExitModel(net, policy, np.array(thresholds), "digits-convnet", tuple("0123456789")).save(folder / "study")
    labels = splits.val.labels.numpy()
    save_logits(ExitLogits(run.logits, labels, run.logits.copy(), labels.copy(), np.array([1, 2, 3]),
                           np.array([2e-4, 3e-4, 5e-4]), Measurements()), folder / "study" / "logits.safetensors")
    export(folder / "onnx", source=folder / "study")
    return folder / "study", folder / "onnx", splits.test.images[:40].numpy(), splits.test.labels[:40].numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", type=Path, help="a study's output folder (logits, thresholds, stage times)")
    ap.add_argument("--export", type=Path, help="its ONNX export")
    ap.add_argument("--data-dir", type=Path, help="CIFAR-10 (the test images are served)")
    ap.add_argument("--images", type=int, default=1000, help="test images served per placement and link")
    ap.add_argument("--links", default="1:100,20:40,100:20,1000:5", help="MBPS:RTT_MS,... (the emulated links)")
    ap.add_argument("--device-cpu-share", type=float, default=0.25, help="the emulated device's speed, a share of "
                    "one CPU's (--device-emulation; 0: no emulation, the device tier served as the cloud's)")
    ap.add_argument("--device-emulation", choices=("quota", "stretch", "pace"), default="pace", help="how the "
                    "device is made slower: quota, a cgroup's CPU quota (link_relay.CpuLimit); stretch, each model "
                    "call followed by a sleep, the model's work taking 1/share of its time (link_relay.Stretch); "
                    "pace, each model call padded to 1/share of its graph's time per row measured once at the start "
                    "(a device whose speed holds whatever the VM's does)")
    ap.add_argument("--link-rate", choices=("relay", "tbf"), default="relay", help="what limits a link's rate: "
                    "the relay (a serial line, in user space) or tbf on a veth pair into a network namespace this "
                    "run creates, the cloud inside (the relay then adds the RTT only)")
    ap.add_argument("--concurrency", type=int, default=1, help="requests in flight (1: each image's latency alone)")
    ap.add_argument("--starts", type=int, default=6, help="fresh processes per placement, in turn, the images split "
                    "among them, and per tier for its costs (their median): an emulated device's speed varies by up "
                    "to 45%% from one start to the next (docs/tiers.md)")
    ap.add_argument("--measure-each-link", action=argparse.BooleanOptionalAction, default=True, help="measure the "
                    "tiers again just before each link's placements (the VM's speed moves over minutes: the costs "
                    "then date from the minutes they predict; --no-measure-each-link: once, before the first link)")
    ap.add_argument("--measure-in-turns", action=argparse.BooleanOptionalAction, default=True, help="also measure "
                    "the tiers (one fresh process each) before every start, and print each row's prediction from "
                    "those costs, start by start, beside the plan's: the cost model's error without the drift "
                    "between measuring and serving")
    ap.add_argument("--wire-images", type=int, default=500, help="validation images to measure the wire formats on")
    ap.add_argument("--accuracy-images", type=int, default=0, help="afterwards, the placements the plan chose and "
                    "all-cloud serve this many test images again, untimed, for their accuracy and bytes (0: the whole "
                    "test set; -1: skip)")
    ap.add_argument("--concurrency-untimed", type=int, default=8, help="requests in flight in that pass")
    ap.add_argument("--tiny", action="store_true", help="smoke run on a random-weight digits-convnet")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # a log file fills in line by line, as the run goes
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            study, export, images, labels = tiny_setup(Path(tmp))
            calibration = wire_on = test_all = images
            test_labels, links = labels, [(20.0, 20.0)]
        else:
            if not (args.study and args.export and args.data_dir):
                ap.error("give --study, --export and --data-dir (or --tiny)")
            from exitwise.data import load_splits
            splits = load_splits("cifar10", args.data_dir, progress=False)
            study, export = args.study, args.export
            images, labels = splits.test.images[:args.images].numpy(), splits.test.labels[:args.images].numpy()
            n = args.accuracy_images if args.accuracy_images > 0 else len(splits.test.labels)
            test_all, test_labels = splits.test.images[:n].numpy(), splits.test.labels[:n].numpy()
            calibration = splits.val.images[:100].numpy()  # the request costs are measured on these
            wire_on = splits.val.images[:args.wire_images].numpy()  # the plan's wire format is chosen on these
            links = [tuple(float(v) for v in item.split(":")) for item in args.links.split(",")]
        runner = OnnxEarlyExit.load(export)
        model, k = runner.manifest.model.rstrip("/").rsplit("/", 1)[-1], runner.num_exits
        full = runner.run_backbone(images).predictions
        wire = measure_wire(runner, wire_on[:args.wire_images])
        cache, m = load_logits(study), runner.manifest
        costs = study_costs(cache.val_logits, cache.stage_seconds_per_sample, export_shapes(m), policy=m.policy,
                            thresholds=m.thresholds, temperatures=m.temperatures, wire=wire)
        from exitwise.device import machine, machine_load
        host = machine().describe()  # before this process leaves the device's CPU to it
        print(f"machine: {host}; {machine_load().describe()}")
        share, cpu, paced = args.device_cpu_share, os.cpu_count() - 1, None
        if share > 0 and args.device_emulation == "pace":
            argv, env = pace_command(export, cpu)
            paced = json.loads(subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout)
            print(f"device paced at 1/{share:g} of, ms per row on CPU {cpu}: "
                  + ", ".join(f"{name} {1000 * v:.3f}" for name, v in paced.items()))
        if share <= 0:
            limit = None
        elif args.device_emulation == "quota":
            limit = CpuLimit(share, cpu=cpu) if CpuLimit.available() else None
        else:
            limit = Stretch(share, cpu=cpu, paced=paced)
        if args.device_cpu_share > 0 and limit is None:
            print("no cgroup cpu controller here (or not root): the device runs as fast as the cloud")
        if limit:
            atexit.register(limit.close)  # also when the run fails (its tiers have stopped by then)
        if limit and os.cpu_count() > 1:  # the device's CPU is its own: everything else (the client, the relays,
            os.sched_setaffinity(0, set(range(os.cpu_count())) - {limit.cpu})  # the cloud) runs on the others
        rows, measured = [], []
        print(f"model {model}; {len(images)} images; full network accuracy {100 * (full == labels).mean():.2f}%; "
              f"{args.concurrency} request(s) in flight")
        for i, (mbps, rtt) in enumerate(links):
            if i == 0 or args.measure_each_link:
                tiers = measure_tiers(export, model, calibration, limit, args.starts)
                measured.append({"before_link": [mbps, rtt], "tiers": [t.to_json() for t in tiers]})
            netns = NetnsLink(mbps) if args.link_rate == "tbf" else None
            try:
                rows += run_link(args, export, model, images, labels, calibration, tiers, costs, k, mbps, rtt, limit,
                                 netns)
            finally:
                if netns:
                    netns.close()
        whole = whole_test_set(rows, export, model, test_all, test_labels, args.concurrency_untimed) \
            if args.accuracy_images >= 0 else None
        if args.out:
            from exitwise.io import atomic_write_json
            atomic_write_json(args.out, {"machine": host, "load": machine_load().to_json(), "images": len(images), "rows": rows,
                                         "measured_tiers": measured, "link_rate": args.link_rate,
                                         "full_network_accuracy": 100 * float((full == labels).mean()),
                                         "wire": wire.to_json(), "whole_test_set": whole})


def run_link(args, export: Path, model: str, images: np.ndarray, labels: np.ndarray, calibration: np.ndarray,
             tiers: tuple[Tier, Tier], costs, k: int, mbps: float, rtt: float, limit: CpuLimit | Stretch | None,
             netns: NetnsLink | None) -> list[dict]:
    """all-cloud, all-device, the best split and the plan's choice over one link: printed, and returned as rows."""
    rows = []
    measured_rtt = effective_rtt_ms(export, model, calibration[0], mbps, rtt, netns)
    print(f"link {mbps:g} Mbit/s ({'tbf' if netns else 'relay'}), {rtt:g} ms: its round trip measured "
          f"{measured_rtt:.2f} ms")
    print(f"{'link':>14s} {'placement':>18s} {'wire':>4s} {'pred ms':>8s} {'mean ms':>8s} {'p50 ms':>8s} "
          f"{'p99 ms':>8s} {'B/img':>9s} {'pred B':>9s} {'acc %':>6s} {'degr':>4s}")
    p = plan(tiers, (Link("device", "cloud", mbps, measured_rtt),), costs)
    split = min((c for c in p.candidates if all(c.stages)), key=lambda c: c.latency_ms)
    named = {"all-cloud": next(c for c in p.candidates if c.stages == (None, (0, k - 1))),
             "all-device": next(c for c in p.candidates if c.stages == ((0, k - 1), None)),
             "best split": split, "plan": p.choice}
    distinct = list(dict.fromkeys(named.values()))  # a candidate is served once: the plan's row is the
    in_turns = []  # measurement of the candidate it chose
    remeasure = (lambda: in_turns.append(measure_tiers(export, model, calibration, limit, 1))) \
        if args.measure_in_turns else None
    measured = dict(zip(distinct, measure_in_turns(
        [(c.stages, c.wire, c.links[0].payload == "input") for c in distinct], export, model, images, labels, mbps,
        rtt, args.concurrency, limit, netns, args.starts, remeasure)))
    at_serve, in_turn_plan = {}, None  # each candidate predicted again from the costs measured between its starts
    if in_turns:
        # each start predicted from the costs measured just before it, the starts weighted by their images: the
        # prediction of the mean over the starts (latency is linear in the costs: the costs' means give the same)
        weights = np.array([len(part) for part in np.array_split(np.arange(len(images)), args.starts)], float)
        serving = tuple(combined_tier(measured, weights) for measured in zip(*in_turns))
        print("costs measured between the starts (means): " + "; ".join(
            f"{t.name} stage ms {'/'.join(f'{1000 * v:.2f}' for v in t.stage_seconds)}, request "
            f"{1000 * t.request_seconds:.2f}" for t in serving))
        per_start = {c: [candidate(c.stages, turn, p.links, costs).latency_ms for turn in in_turns]
                     for c in distinct}
        at_serve = {c: float(np.average(v, weights=weights)) for c, v in per_start.items()}
        again_plan = plan(serving, p.links, costs).choice  # the plan made from those costs instead
        served = next((c for c in distinct if (c.stages, c.wire, c.links[0].payload)
                       == (again_plan.stages, again_plan.wire, again_plan.links[0].payload)), None)
        best = min(distinct, key=lambda c: measured[c]["mean_ms"])
        stages = placement_label(again_plan.stages)
        in_turn_plan = {"stages": again_plan.stages, "wire": again_plan.wire,
                        "send_images": again_plan.links[0].payload == "input",
                        "predicted_ms": again_plan.latency_ms, "served": served is not None}
        if served is None:
            print(f"the plan from the costs between the starts: {stages} {again_plan.wire}, predicted "
                  f"{again_plan.latency_ms:.2f} ms; not one of the placements served")
        else:
            m = measured[served]["mean_ms"]
            in_turn_plan.update(measured_ms=m, best_measured_ms=measured[best]["mean_ms"])
            print(f"the plan from the costs between the starts: {stages} {again_plan.wire}, predicted "
                  f"{again_plan.latency_ms:.2f} ms, measured {m:.2f} ({100 * (m / again_plan.latency_ms - 1):+.1f}%),"
                  f" {100 * (m / measured[best]['mean_ms'] - 1):+.1f}% against the best measured row")
    first = {}  # each candidate's first name
    for name, c in named.items():
        again = c in first
        first.setdefault(c, name)
        m = measured[c]
        label = f"{name} {placement_label(c.stages)}"
        print(f"{f'{mbps:g}Mb/{rtt:g}ms':>14s} {label:>18s} {c.wire:>4s} {c.latency_ms:8.2f} "
              f"{m['mean_ms']:8.2f} {m['p50_ms']:8.2f} {m['p99_ms']:8.2f} {m['bytes_per_image']:9.0f} "
              f"{c.traffic_bytes:9.0f} {m['accuracy']:6.2f} {m['degraded']:4d}"
              + (f"  (= {first[c]}: the same run)" if again else "")
              + (f"  predicted from the costs between its starts: {at_serve[c]:.2f}" if c in at_serve and not again
                 else ""))
        if args.starts > 1 and not again:
            print(f"{'':>33s} mean ms per start: " + ", ".join(f"{v:.2f}" for v in m["mean_ms_per_start"])
                  + ("; predicted from the costs before each: " + ", ".join(f"{v:.2f}" for v in per_start[c])
                     if in_turns else ""))
        rows.append({"mbps": mbps, "rtt_ms": rtt, "measured_rtt_ms": measured_rtt, "placement": name,
                     "stages": c.stages, "wire": c.wire, "send_images": c.links[0].payload == "input",
                     "predicted_ms": c.latency_ms,
                     "predicted_bytes": c.traffic_bytes, "predicted_at_serve_ms": at_serve.get(c),
                     "predicted_per_start_ms": per_start.get(c) if in_turns else None,
                     "plan_at_serve": in_turn_plan if name == "plan" else None,
                     "same_run_as": first[c] if again else None, **m})
    return rows


if __name__ == "__main__":
    sys.exit(main())
