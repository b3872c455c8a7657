"""What a saved file records about where its figures came from: the network and its weights (`ModelRef`), the data
(`DatasetRef`), the machine, its software and how busy it was (`Machine`, `Software`, `Load`), and the probes that
chose the precision and the micro-batch (`PrecisionCheck`, `MicroBatchProbe`; for training `TrainPrecisionProbe`).
Torch-free, so those files read without torch; `models/ref.py` resolves a `ModelRef` to a network,
`data.Splits.describe()` makes a `DatasetRef`, `device` measures the machine and `tune` runs the probes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import UserError


def missing_fields(kind, doc) -> list[str]:
    """The fields of dataclass `kind` that `doc` (parsed JSON) lacks or holds as null."""
    return [f.name for f in dataclasses.fields(kind) if not isinstance(doc, dict) or doc.get(f.name) is None]


@dataclass(frozen=True)
class ModelRef:
    """A network and its weights, as results.json's `model` and a study's logits record them."""
    name: str             # a registered model, or the absolute path of a folder `exitwise attach` wrote
    weights: str          # the weights file (or shard index); an attached folder's own model.safetensors
    weights_sha256: str   # of every file the weights are made of (a shard index, then its shards)
    shipped: bool         # the weights came with the package
    num_exits: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict, named_by: str) -> ModelRef:
        """The `model` a saved file (`named_by`) records; refused in one line if it lacks a field."""
        missing = missing_fields(cls, doc)
        if missing:
            raise UserError(f"{named_by!r} does not name the model and weights it came from (no {missing[0]})")
        return cls(**{f.name: doc[f.name] for f in dataclasses.fields(cls)})

    def __getitem__(self, key: str):
        """`ref["weights_sha256"]`: the dict `api.load_model` returned before (kept for one release)."""
        return self.to_json()[key]


@dataclass(frozen=True)
class SplitSizes:
    """Images in each split."""
    train: int
    val: int
    test: int


@dataclass(frozen=True)
class DatasetRef:
    """The data a study or training run used, as results.json's `dataset`, a study's logits and a model card record
    it (`Splits.describe()`)."""
    name: str                  # "cifar10", "digits", "folder", or a caller's own name
    source: str                # where the images came from (a path, or "scikit-learn digits")
    classes: tuple[str, ...]
    sizes: SplitSizes
    split_seed: int            # the seed that chose the validation images from train

    @property
    def val_size(self) -> int:
        """= sizes.val; the files have always had both (written, not read back)."""
        return self.sizes.val

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "classes": list(self.classes), "val_size": self.val_size}


@dataclass(frozen=True)
class Machine:
    """Where a figure was measured (`device.machine`)."""
    cpu: str            # the CPU's model name
    capability: str     # torch's widest CPU kernels here: AVX2, AVX512, ...
    native_bf16: bool   # AMX or AVX512_BF16: bf16 in hardware, not emulated
    threads: int
    torch: str
    device: str
    accelerator: str | None = None  # the GPU's name when `device` is one (CUDA, or Apple's MPS)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        bf16 = "native bf16" if self.native_bf16 else "no native bf16"
        on = f" ({self.accelerator})" if self.accelerator else ""
        return (f"{self.cpu} ({self.capability}, {bf16}), {self.threads} threads, torch {self.torch}, "
                f"device {self.device}{on}")


@dataclass(frozen=True)
class Software:
    """The versions a figure was measured with (`study.software_versions`)."""
    exitwise: str
    python: str
    torch: str
    numpy: str
    platform: str
    cpu_threads: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return (f"exitwise {self.exitwise}, python {self.python}, torch {self.torch}, numpy {self.numpy}, "
                f"{self.cpu_threads} CPU threads")


@dataclass(frozen=True)
class Load:
    """How busy the CPUs were just before timed work (`device.machine_load`)."""
    load_average: float | None  # over the last minute (trails: it still counts a job that ended a minute ago)
    cpus: int
    busy: bool                  # enough to make timings slow and noisy
    busy_share: float | None = None  # other processes' share of the CPUs' time over a tenth of a second (None: no
                                     # /proc/stat, or a file from before it was recorded)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """In words, for a benchmark's header."""
        share = "" if self.busy_share is None else f"other work used {self.busy_share:.0%} of them just now, "
        average = "no load average" if self.load_average is None else f"1-minute load average {self.load_average}"
        busy = ": BUSY, the timings below are not to be trusted" if self.busy else ""
        return f"{self.cpus} CPUs: {share}{average}{busy}"


@dataclass(frozen=True)
class PrecisionTried:
    """One precision in `tune.choose_precision`'s probe."""
    precision: str
    ms_per_image: float | None = None  # None: not timed (files from before the probe timed every candidate)
    agreement_per_exit: tuple[float, ...] | None = None  # share of images whose prediction equals fp32's (None: not
    agreement_with_fp32: float | None = None              # checked); the lowest exit's share; fp32's own is 1.0


@dataclass(frozen=True)
class PrecisionCheck:
    """The evidence for a chosen precision: every candidate timed, agreement with fp32 measured for those faster
    than fp32 until one agreed on at least `required` of `images` images at every exit."""
    precision: str
    agreement_with_fp32: float | None
    images: int
    required: float
    tried: tuple[PrecisionTried, ...]  # fastest first
    probe_images: int | None = None    # images per timed call
    timing_cached: bool = False        # the speeds came from this machine's probe cache
    agreement_cached: tuple[str, ...] = ()  # precisions whose agreement came from the cache ...
    agreement_given: tuple[str, ...] = ()   # ... or from the model's card, measured on real images
    machine: Machine | None = None

    def agreement(self, num_exits: int) -> dict[str, tuple[float, ...]] | None:
        """The per-exit agreement with fp32 measured for the reduced precisions, by precision (None: none was)."""
        found = {t.precision: t.agreement_per_exit for t in self.tried if t.precision != "fp32"
                 and t.agreement_per_exit is not None and len(t.agreement_per_exit) == num_exits}
        return found or None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainPrecisionProbe:
    """The evidence for training's precision (`tune.choose_train_precision`): a training step's time per image in
    fp32 and in bf16 autocast, on the same batch."""
    precision: str
    ms_per_image: dict[str, float]  # by precision
    probe_images: int
    machine: Machine | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MicroBatchProbe:
    """The evidence for a chosen micro-batch (`tune.choose_micro_batch`): the full network's time per image at each
    size tried, on the same images."""
    micro_batch: int
    ms_per_image: dict[str, float]  # by micro-batch size
    probe_images: int
    precision: str
    machine: Machine | None = None
    busy_share: float | None = None  # other work's share of the CPUs as it was timed
    cached: bool = False             # from this machine's probe cache

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
