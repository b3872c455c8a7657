"""Copy a training run's weights and model card into the package (src/exitwise/weights/).

    python scripts/ship_weights.py RUN_DIR NAME [--float16] --check-data CIFAR_SOURCE
    python scripts/ship_weights.py --check-only NAME --check-data CIFAR_SOURCE   # refresh a shipped card's checks

--float16 stores floating-point tensors as float16 (they load back into float32). Weights larger than
exitwise.models.MAX_SHARD_BYTES are written as safetensors shards with an index, so every file in the
repository stays under its 8 MiB limit. With --check-data the card also records `check_subset`: the
shipped weights' per-exit accuracy in fp32 on the first CHECK_IMAGES test images, which the tests
reproduce in seconds on any CPU (a full-set pass in bf16 takes minutes where bf16 is emulated); and
`precision_agreement`: per exit, the share of the first CHECK_IMAGES validation images on which bf16 and mixed
predict as fp32 does, which `exitwise serve --model NAME` checks a precision against (it has no images of its own).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from exitwise.api import load_model
from exitwise.config import PRECISIONS
from exitwise.data import load_splits
from exitwise.device import machine
from exitwise.io import atomic_write_bytes, atomic_write_json
from exitwise.models import (INDEX_SUFFIX, MAX_SHARD_BYTES, SHIPPED_WEIGHTS_DIR, ModelCard, save_sharded,
                            shipped_card)
from exitwise.models.card import PrecisionAgreement
from exitwise.runtime import all_exit_logits, prepare
from exitwise.train import evaluate

CHECK_IMAGES = 1000


def check_subset(name: str, data_source: Path) -> dict:
    """Per-exit fp32 accuracy of the shipped weights of `name` on the first CHECK_IMAGES test images."""
    test = load_splits("cifar10", data_source, progress=False).test
    model, _ = load_model(name)
    accuracy = evaluate(model, test.subset(torch.arange(CHECK_IMAGES)), precision="fp32")
    return {"split": "test", "images": CHECK_IMAGES, "which": "the first images in the decoded order (class folders "
            "airplane ... truck, files sorted by name)", "precision": "fp32", "accuracy": accuracy}


def precision_agreement(name: str, data_source: Path) -> PrecisionAgreement:
    """Per exit, the share of the first CHECK_IMAGES validation images on which each reduced precision predicts the
    class fp32 predicts (what `exitwise.tune` requires AGREEMENT_REQUIRED of)."""
    val = load_splits("cifar10", data_source, progress=False).val.subset(torch.arange(CHECK_IMAGES))
    model, _ = load_model(name)
    fp32 = all_exit_logits(prepare(model, "fp32"), val).logits.argmax(-1)
    agree = {p: (all_exit_logits(prepare(model, p), val).logits.argmax(-1) == fp32).mean(1).round(4)
             for p in PRECISIONS if p != "fp32"}
    per_exit = {p: tuple(a.tolist()) for p, a in agree.items()}
    return PrecisionAgreement("validation", CHECK_IMAGES, per_exit, machine().describe())


def checked(card: ModelCard, name: str, data_source: Path) -> ModelCard:
    """`card` with the entries that the data set checks of the shipped `name`: `check_subset` and
    `precision_agreement`."""
    return replace(card, check_subset=check_subset(name, data_source),
                   precision_agreement=precision_agreement(name, data_source))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, nargs="?", help="an `exitwise train --out` directory")
    p.add_argument("name", nargs="?", help="the registered model name")
    p.add_argument("--float16", action="store_true")
    p.add_argument("--check-data", type=Path, help="CIFAR-10 source for the card's check_subset")
    p.add_argument("--check-only", metavar="NAME", help="only refresh the checks of a shipped model's card")
    args = p.parse_args()
    if args.check_only:
        card = checked(shipped_card(args.check_only), args.check_only, args.check_data)
        atomic_write_json(SHIPPED_WEIGHTS_DIR / f"{args.check_only}.json", card.to_json())
        print(f"{args.check_only}: check_subset {card.check_subset['accuracy']}; precision agreement "
              f"{card.precision_agreement.per_exit}")
        return
    # both read before anything is replaced
    state = load_file(str(args.run_dir / "model.safetensors"))
    card = ModelCard.from_json(json.loads((args.run_dir / "model.json").read_text()))
    if args.float16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    for old in [SHIPPED_WEIGHTS_DIR / f"{args.name}.safetensors", *SHIPPED_WEIGHTS_DIR.glob(f"{args.name}-0*-of-0*"),
                SHIPPED_WEIGHTS_DIR / f"{args.name}{INDEX_SUFFIX}"]:
        old.unlink(missing_ok=True)
    metadata = {"model": args.name}
    if sum(v.nbytes for v in state.values()) <= MAX_SHARD_BYTES:
        weights = SHIPPED_WEIGHTS_DIR / f"{args.name}.safetensors"
        atomic_write_bytes(weights, save(state, metadata=metadata))
    else:
        weights = SHIPPED_WEIGHTS_DIR / f"{args.name}{INDEX_SUFFIX}"
        save_sharded(state, weights, metadata=metadata)
    dtypes = tuple(sorted({str(v.dtype).removeprefix("torch.") for v in state.values()}))  # float16 loads as float32
    card = replace(card, weights=weights.name, stored_dtypes=dtypes)
    atomic_write_json(SHIPPED_WEIGHTS_DIR / f"{args.name}.json", card.to_json())
    if args.check_data:
        card = checked(card, args.name, args.check_data)
        atomic_write_json(SHIPPED_WEIGHTS_DIR / f"{args.name}.json", card.to_json())
    for path in sorted(SHIPPED_WEIGHTS_DIR.glob(f"{args.name}*")):
        print(f"{path.stat().st_size / 2**20:6.2f} MiB  {path}")


if __name__ == "__main__":
    main()
