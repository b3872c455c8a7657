"""The founding figure made real: seed-branchynet served as four tiers, one per node of `../shared/seed/net.png`.

    exitwise study --dataset cifar10 --data-dir ../shared/data/cifar10-jpg.tar.gz --model seed-branchynet --out s
    exitwise export --from s --out s-onnx
    python benchmarks/seed_tiers.py --export s-onnx --data-dir ../shared/data/cifar10-jpg.tar.gz [--wire fp32]

Four `exitwise serve` processes on 127.0.0.1 (node 1: stages 0-1, node 2: 2-3, node 3: 4, node 4: 5, as in
docs/tiers.md), chained with --next; the test images go to node 1, one binary V2 request each, a few in flight.
Prints, per node, the images answered there and what its link to the next node carried (samples, bytes per
image sent in), read from each node's /metrics; and whether every answer equals the single-process early exit
of the same export (`OnnxEarlyExit.run`). No link emulation and no timing: this is about what crosses each link.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import re
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np

from link_relay import ServeProcess
from tiers import Client

from exitwise.deploy.onnx_runtime import OnnxEarlyExit

NODES = (("node1", "0-1"), ("node2", "2-3"), ("node3", "4-4"), ("node4", "5-5"))


def metric(url: str, name: str) -> float:
    """The sum of a Prometheus counter's samples on a tier's /metrics."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:_total)?(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, required=True, help="an export of seed-branchynet (six stages)")
    ap.add_argument("--data-dir", type=Path, required=True, help="CIFAR-10 (its test images are sent)")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--wire", default="fp32", help="fp32, fp16 or int8 on every link")
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    runner = OnnxEarlyExit.load(args.export)
    if runner.num_exits != 6:
        sys.exit(f"{args.export} has {runner.num_exits} stages; the founding network has six")
    from exitwise.data import load_splits
    test = load_splits("cifar10", args.data_dir, progress=False).test
    images, labels = test.images[:args.images].numpy(), test.labels[:args.images].numpy()
    expected = runner.run(images)
    model = runner.manifest.model.rstrip("/").rsplit("/", 1)[-1]
    nodes: list[ServeProcess] = []
    try:
        for name, stages in reversed(NODES):  # the last node first, so each --next is up
            more = ["--next", nodes[0].url, "--wire", args.wire] if nodes else []
            nodes.insert(0, ServeProcess(args.export, "--stages", stages, "--tier", name, *more))
        local, clients = threading.local(), []

        def ask(image: np.ndarray) -> dict:  # each thread on its own keep-alive connection
            if not hasattr(local, "client"):
                local.client = Client(nodes[0].url)
                clients.append(local.client)
            return local.client.infer(model, image)[1]

        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            answers = list(pool.map(ask, images))
        for client in clients:
            client.close()
        outs = [{o["name"]: o["data"][0] for o in a["outputs"]} for a in answers]
        tiers = [a.get("parameters", {}).get("tier", ["?"])[0] for a in answers]
        exits, classes = np.array([o["exit"] for o in outs]), np.array([o["class_index"] for o in outs])
        same = float(((exits == expected.exits) & (classes == expected.predictions)).mean())
        print(f"seed-branchynet as four tiers ({args.wire} on the links), {len(images)} CIFAR-10 test images; "
              f"accuracy {100 * (classes == labels).mean():.2f}%; answers equal to the single-process early exit: "
              f"{100 * same:.2f}%")
        print(f"{'node':6s} {'stages':6s} {'answered':>9s} {'sent on':>8s} {'B per sample sent':>18s} "
              f"{'B per test image':>17s}")
        for (name, stages), node in zip(NODES, nodes):
            sent, sent_bytes = metric(node.url, "exitwise_forwarded_samples"), metric(node.url, "exitwise_forwarded_bytes")
            answered = sum(t == name for t in tiers)
            print(f"{name:6s} {stages:6s} {answered:9d} {int(sent):8d} {sent_bytes / max(sent, 1):18.0f} "
                  f"{sent_bytes / len(images):17.0f}")
    finally:
        for node in nodes:
            node.stop()


if __name__ == "__main__":
    sys.exit(main())
