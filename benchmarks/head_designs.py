"""Which head learns most at a cut? exitwise's head kinds trained side by side on one frozen backbone's features.

    python benchmarks/head_designs.py --weights runs/resnet18/resnet18.safetensors [--exits layer1,layer2.0]

The plain ResNet-18 (scripts/resnet18_cifar.py) is cut at `--exits` with `exitwise.attach`; one head of every
(C, H, W) kind (`models.heads.MAP_HEAD_KINDS`, any budget: conv heads C channels wide) per exit learns from the same
augmented batches and the same frozen features (one trunk pass per batch feeds them all), with the optimizer and
schedule of `exitwise attach` (bf16 autocast or fp32, whichever trains faster here, timed as `exitwise attach`
times it). Printed after each epoch: every head's validation accuracy; first, each head's MACs.
Faster than benchmarks/byom_heads.py (which trains each kind in its own run, then runs the study) and fairer: the
heads see identical data. It measures accuracy, not time.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from exitwise.api import ATTACH_DEFAULTS
from exitwise.models.attach import attach, build_user_model, feature_shapes, load_user_weights
from exitwise.models.costs import module_macs
from exitwise.data import load_splits
from exitwise.device import machine
from exitwise.refs import TrainPrecisionProbe
from exitwise.tune import choose_train_precision
from exitwise.models.heads import MAP_HEAD_KINDS, map_head
from exitwise.train import TrainConfig, augment

from byom_common import RESNET18, resnet18_parser, seeded_train_subset


def main() -> None:
    p = resnet18_parser(__doc__, exits="layer1,layer2.0", epochs=3)
    p.add_argument("--train-images", type=int, default=20000, help="seeded training images the heads learn from")
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    torch.manual_seed(0)
    splits = load_splits("cifar10", args.data, progress=False)
    train = seeded_train_subset(splits, args.train_images).train
    train_x, train_y = train.images, train.labels
    model = build_user_model(RESNET18)
    load_user_weights(model, args.weights)
    exits = args.exits.split(",")
    network = attach(model.eval(), exits, 10, (3, 32, 32), warn=False).to(memory_format=torch.channels_last)
    for param in network.stages.parameters():  # frozen, as `exitwise attach` trains: the probe times what it times
        param.requires_grad_(False)
    precision, probe = choose_train_precision(network, augment(train_x[:64], 0, False), train_y[:64],
                                              torch.device("cpu"))
    bf16 = precision == "bf16"
    trunk = network.stages[:len(exits)]  # the stages up to the last side exit: all the heads need
    shapes = feature_shapes(network.stages, (3, 32, 32))[:len(exits)]
    kinds = [k for k in MAP_HEAD_KINDS if k != "auto"]
    heads = nn.ModuleList(nn.ModuleList(map_head(shape, 10, 1e18, kind) for kind in kinds) for shape in shapes)
    heads.to(memory_format=torch.channels_last)
    print(f"machine: {machine().describe()}; {precision} (ms per image of a training step: {probe_times(probe)}); "
          f"{len(train_x)} training images, {args.epochs} epochs, validation on {len(splits.val)}")
    for exit_name, shape, row in zip(exits, shapes, heads):
        print(f"  {exit_name} {shape}: " + ", ".join(f"{kind} {module_macs(h, (1, *shape)) / 1e6:.2f} M MACs"
                                                     for kind, h in zip(kinds, row)))
    steps = len(train_x) // args.batch_size
    recipe = TrainConfig(**ATTACH_DEFAULTS)
    optimizer = torch.optim.SGD(heads.parameters(), lr=recipe.lr, momentum=recipe.momentum, nesterov=True,
                                weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.lr, total_steps=steps * args.epochs,
                                                    pct_start=0.3, cycle_momentum=False)
    generator = torch.Generator().manual_seed(1)
    for epoch in range(args.epochs):
        start = time.perf_counter()
        heads.train()
        perm = torch.randperm(len(train_x), generator=generator)
        for step in range(steps):
            batch = perm[step * args.batch_size:(step + 1) * args.batch_size]
            x, y = augment(train_x[batch], recipe.crop_padding, recipe.flip, generator), train_y[batch]
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                loss = sum(F.cross_entropy(h(f).float(), y) for f, row in zip(features(trunk, x), heads) for h in row)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        accuracy = validate(trunk, heads, splits.val, bf16)
        print(f"epoch {epoch + 1} ({time.perf_counter() - start:.0f} s): " + "; ".join(
            f"{e} " + " ".join(f"{kind} {a:.1%}" for kind, a in zip(kinds, row)) for e, row in zip(exits, accuracy)),
            flush=True)


def probe_times(probe: TrainPrecisionProbe) -> str:
    """The training precision probe's time per image of each precision, as printed."""
    return ", ".join(f"{name} {ms:.2f}" for name, ms in probe.ms_per_image.items())


def features(trunk: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    """The frozen trunk's features at every cut, without autograd."""
    out = []
    with torch.no_grad():
        for stage in trunk:
            x = stage(x)
            out.append(x)
    return out


def validate(trunk: nn.ModuleList, heads: nn.ModuleList, data, bf16: bool) -> list[list[float]]:
    """Each head's accuracy on `data`."""
    heads.eval()
    correct = torch.zeros(len(heads), len(heads[0]))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        for x, y in data.batches(500):
            for i, (f, row) in enumerate(zip(features(trunk, x), heads)):
                correct[i] += torch.tensor([(h(f).argmax(-1) == y).sum().item() for h in row])
    return (correct / len(data)).tolist()


if __name__ == "__main__":
    main()
