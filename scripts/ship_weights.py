"""Copy a training run's weights and model card into the package (src/exitwise/weights/).

    python scripts/ship_weights.py RUN_DIR NAME [--float16]

--float16 stores floating-point tensors as float16 (they load back into float32). Weights larger than
exitwise.models.MAX_SHARD_BYTES are written as safetensors shards with an index, so every file in the
repository stays under its 8 MiB limit.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file, save

from exitwise.io import atomic_write_bytes, atomic_write_json
from exitwise.models import INDEX_SUFFIX, MAX_SHARD_BYTES, SHIPPED_WEIGHTS_DIR, save_sharded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="an `exitwise train --out` directory")
    p.add_argument("name", help="the registered model name")
    p.add_argument("--float16", action="store_true")
    args = p.parse_args()
    state = load_file(str(args.run_dir / "model.safetensors"))
    card = json.loads((args.run_dir / "model.json").read_text())  # both read before anything is replaced
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
    card["weights"] = weights.name
    card["stored_dtypes"] = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})  # load as float32
    atomic_write_json(SHIPPED_WEIGHTS_DIR / f"{args.name}.json", card)
    for path in sorted(SHIPPED_WEIGHTS_DIR.glob(f"{args.name}*")):
        print(f"{path.stat().st_size / 2**20:6.2f} MiB  {path}")


if __name__ == "__main__":
    main()
