"""Defaults and options in one place, torch-free: the CLI builds its flags from these dataclasses' fields (a field
with a `help` is a flag) without importing torch, and `deploy/` reads its defaults here."""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import UserError

__version__ = "0.1.0"

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("bf16", "mixed", "fp32")
AGREEMENT_REQUIRED = 0.99  # a reduced precision may change at most 1% of any exit's predictions
DEFAULT_MICRO_BATCH = 64   # used when nothing is measured (tests, explicit runs); best on the AMX machine
DEFAULT_DELTA = 0.1        # allowed failure probability of a calibration guarantee unless the caller says otherwise
SCHEDULES = ("onecycle", "cosine")
TRAIN_PRECISIONS = ("auto", "bf16", "fp32")


def check_precision(precision: str, allow_auto: bool = True) -> str:
    known = ("auto",) * allow_auto + PRECISIONS
    if precision not in known:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(known)}")
    return precision


def check_micro_batch(micro_batch: int | None) -> int | None:
    if micro_batch is not None and micro_batch < 1:
        raise UserError(f"micro-batch must be a positive number of rows, got {micro_batch}")
    return micro_batch


def option(default: Any = dataclasses.MISSING, help: str = "", parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field that is also a command-line flag (--field-name): its help and, where the type alone does not
    say it, how to parse the text."""
    return field(default=default, metadata={"help": help, "parse": parse})


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def as_tuple(value: Any, name: str) -> tuple:
    """A list-valued setting given from Python, as a tuple; a lone string or number is refused in one line (tuple()
    would make a string its characters: exits="layer1,layer2" cut at 'l', 'a', ...)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, typing.Iterable):
        example = list(comma_list(value)) if isinstance(value, str) else [value]
        raise UserError(f"{name} takes a list, e.g. {example!r}, got {value!r}")
    return tuple(value)


def float_list(text: str) -> tuple[float, ...]:
    import argparse
    try:
        return tuple(float(v) for v in comma_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def flags(cls, defaults: dict | None = None, per_dataset: dict[str, dict] | None = None) -> list[tuple[str, dict]]:
    """(flag, argparse keywords) for each field of `cls` with a help text, in field order. Every default is None, so
    a flag not given leaves the dataclass's default; `given(args, cls)` collects the ones given. `defaults`: the
    values a command puts in place of some of the dataclass's defaults, as its help shows them; `per_dataset`: a
    data set's own defaults, shown beside them (`TRAIN_DEFAULTS`)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("help"):
            continue
        kind = hints[f.name]
        also = "".join(f"; --dataset {name}: {_shown(own[f.name])}" for name, own in (per_dataset or {}).items()
                       if f.name in own)
        kwargs: dict = {"help": f.metadata["help"] + _default_note(f, (defaults or {}).get(f.name, f.default), also),
                        "dest": f.name}
        if kind is bool:
            kwargs.update(action="store_true", default=None)
        else:
            plain = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
            kwargs["type"] = f.metadata.get("parse") or plain
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
        out.append(("--" + f.name.replace("_", "-"), kwargs))
    return out


def _default_note(f: dataclasses.Field, value: Any, also: str = "") -> str:
    """" (default X)" for a help text, unless the default is nothing to show (None, False, empty) or the text says it;
    `also`: what follows X (another data set's default)."""
    if (value is dataclasses.MISSING or value is None or value is False or value in ((), "")
            or "default" in f.metadata["help"]):
        return ""
    return f" (default {_shown(value)}{also})"


def _shown(value: Any) -> str:
    return (f"{value:g}" if isinstance(value, float) else ",".join(map(str, value)) if isinstance(value, tuple)
            else str(value))


def given(args, cls, skip: tuple[str, ...] = ()) -> dict:
    """The fields of `cls` that the parsed `args` give (not None), as keywords."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in skip and getattr(args, f.name, None) is not None}


@dataclass(frozen=True)
class DataConfig:
    """Which data set, where from, and how train is split into train and validation."""
    dataset: str = option("cifar10", "cifar10, digits (ships with scikit-learn) or folder (any train/<class>/*, "
                                     "test/<class>/* image tree or .tar.gz of one)")
    data_dir: Path | None = option(None, "cifar-10-batches-py/, an image-folder tree train/<class>/*, "
                                         "test/<class>/*, or a .tar.gz of either")
    download: bool = option(False, "fetch the official CIFAR-10 archive into --data-dir")
    val_size: int | None = option(None, "images held out from train for validation (cifar10: 5000)")
    split_seed: int = option(0, "seed of the train/validation split")
    image_size: int | None = option(None, "--dataset folder: resize every image to this size squared")

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "data_dir": None if self.data_dir is None else str(self.data_dir)}


@dataclass(frozen=True)
class AttachConfig:
    """Exits on the user's own model: how to build it, where the exits go and what the heads may cost."""
    model_file: str = option(help="FILE:FUNCTION; FUNCTION() returns your nn.Module (your code runs; normalize "
                                  "inputs inside the model)")
    exits: tuple[str, ...] = option(help="comma-separated submodule names (model.named_modules()), in forward order",
                                    parse=comma_list)
    weights: Path | None = option(None, "your model's state_dict (.safetensors or a PyTorch state_dict)")
    random_init: bool = option(False, "without --weights: train the heads on the frozen backbone as FUNCTION() "
                                      "initialises it (it must then be deterministic: it is rebuilt by running "
                                      "FUNCTION() again); without this flag, --weights or --joint, attach refuses")
    freeze_backbone: bool = True  # the CLI's --joint turns it off: the whole network trains with the heads
    max_head_fraction: float = option(0.25, "a head's MACs budget, as a fraction of the stage it follows "
                                            "(default 0.25)")
    token_pool: str = option("mean", "token features: mean or cls (default mean)")
    head: str | tuple[str, ...] = option("auto", "(C, H, W) features: auto (the richest within the budget), "
                                                 "conv-pool, conv, pool or gap; or one per exit, comma-separated "
                                                 "(see docs/bring-your-own-model.md)", parse=comma_list)
    output_key: str | None = option(None, "the logits' key when the model returns a dict (default: logits)")

    def __post_init__(self):
        object.__setattr__(self, "exits", as_tuple(self.exits, "exits"))
        if not isinstance(self.head, str):
            object.__setattr__(self, "head", tuple(self.head))

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "weights": None if self.weights is None else str(self.weights)}


@dataclass
class TrainConfig:
    """The training recipe. Defaults are for CIFAR-10; for digits use crop_padding=1, flip=False."""

    epochs: int = option(40, "passes over the training split")
    batch_size: int = option(256, "global batch size (split across torchrun processes)")
    lr: float = option(0.2, "peak learning rate")
    momentum: float = 0.9                      # Nesterov
    weight_decay: float = option(5e-4, "weight decay")
    label_smoothing: float = option(0.1, "label smoothing of every exit's cross-entropy")
    exit_weights: tuple[float, ...] | None = option(None, "loss weight per exit, comma-separated (default: 1 each, "
                                                          "all exits matter equally)", parse=float_list)
    distill: float = option(0.0, "0..1: how much side exits learn from the final exit's softened predictions "
                                 "instead of the labels (default 0)")
    distill_temperature: float = option(3.0, "temperature of those predictions (default 3)")
    side_gradient: float = option(1.0, "0..1: share of the side exits' gradient that reaches the layers shared "
                                       "with the final exit (default 1: joint, BranchyNet; 0: heads only, SDN)")
    crop_padding: int = 4                      # random crop of the zero-padded image; 0 turns it off
    flip: bool = True                          # random horizontal flip
    cutout: int = option(0, "side of a random square zeroed in each training image (DeVries & Taylor 2017; 0: off)")
    precision: str = option("auto", "auto (default: bf16 autocast where a timed step says it is faster than fp32 "
                                    "here), bf16 or fp32")
    seed: int = option(0, "seed of the data order, augmentation and initialisation")
    schedule: str = option("onecycle", "onecycle (30%% warmup, cosine down) or cosine (5%% linear warmup)")
    freeze_backbone: bool = False              # train the side heads only, on the features of the frozen network

    def __post_init__(self):
        if self.exit_weights is not None:
            self.exit_weights = tuple(float(w) for w in as_tuple(self.exit_weights, "exit_weights"))
            if any(not math.isfinite(w) or w < 0 for w in self.exit_weights) or not any(self.exit_weights):
                raise UserError(f"exit weights must be non-negative and not all zero, got {self.exit_weights}")
        for f in dataclasses.fields(self):  # epochs=2.5 from Python (the CLI's argparse gives ints)
            value = getattr(self, f.name)
            if f.type == "int" and not (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
                raise UserError(f"{f.name} must be a whole number, got {value!r}")
        checks = [(self.epochs >= 1, "epochs must be at least 1"),
                  (self.batch_size >= 1, "batch size must be at least 1"),
                  (self.lr > 0, "learning rate must be positive"),
                  (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
                  (self.weight_decay >= 0, "weight decay must be non-negative"),
                  (0 <= self.label_smoothing < 1, "label smoothing must be in [0, 1)"),
                  (0 <= self.distill <= 1, "distillation weight must be in [0, 1]"),
                  (self.distill_temperature > 0, "distillation temperature must be positive"),
                  (0 <= self.side_gradient <= 1, "side gradient must be in [0, 1]"),
                  (self.crop_padding >= 0, "crop padding must be non-negative"),
                  (self.cutout >= 0, "cutout size must be non-negative"),
                  (self.seed >= 0, "seed must be non-negative"),
                  (self.precision in TRAIN_PRECISIONS, f"precision must be one of {', '.join(TRAIN_PRECISIONS)}"),
                  (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}")]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


# a data set's own training recipe over TrainConfig's (CIFAR-10's): digits' 8x8 images, small and few
TRAIN_DEFAULTS = {"digits": {"crop_padding": 1, "flip": False, "epochs": 30, "batch_size": 64, "lr": 0.05}}
# `exitwise attach` (and `api.train_exits`) in place of TrainConfig's: heads on a frozen network learn in a few epochs
ATTACH_DEFAULTS = {"epochs": 10, "lr": 0.05, "label_smoothing": 0.0}


SERVE_RULES = ("deepest", "oldest", "request-level")  # which stage the serving scheduler runs next


def threads_per_worker(total: int, workers: int) -> int:
    """A serving worker's share of `total` CPU threads when `workers` run stage calls at once (at least one)."""
    return max(1, total // workers)


@dataclass(frozen=True)
class SchedulerConfig:
    """`exitwise serve`'s batching (`deploy.scheduler`). With `max_wait_ms` 0 the worker never waits for a batch to
    fill: what arrived while it ran the last one forms the next, so batches grow with the load by themselves."""
    max_batch: int = option(64, "rows per stage call at most")
    max_wait_ms: float = option(0.0, "how long the first stage waits for a full batch when nothing else waits")
    max_queue: int = option(1024, "samples inside the server, and inference requests in flight, at most; more are "
                                  "refused with 503 at once")
    timeout_ms: float = option(10_000.0, "a request not answered by then gets 504; its samples are dropped")
    schedule: str = option("deepest", f"which stage runs next: {', '.join(SERVE_RULES)}")
    workers: int = option(1, "threads running stage calls at once, sharing out the CPUs' threads (1: a fixed "
                             "choice, for a lone request's latency: on a 2-core AMD Zen 4 capacity within noise of 2, "
                             "sequential requests 20-33%% faster; on a 2-core Intel Xeon with AMX 2 served 1.1-1.3x "
                             "the requests per second, a lone request 6-23%% slower; docs/serve.md; compare on your "
                             "machine with benchmarks/serve_ab.py)")
    first: int = 0               # the stages this scheduler runs: first..last (None: to the final exit)
    last: int | None = None

    def within_ms(self, requested_ms: float | None = None) -> float:
        """How long a request may take: its own deadline where it set one sooner (Triton's `timeout`), else
        timeout_ms."""
        return self.timeout_ms if requested_ms is None else min(requested_ms, self.timeout_ms)

    def __post_init__(self) -> None:
        if self.schedule not in SERVE_RULES:
            raise UserError(f"unknown schedule {self.schedule!r}; known: {', '.join(SERVE_RULES)}")
        checks = [(self.max_batch >= 1, "--max-batch must be at least 1", self.max_batch),
                  (self.max_queue >= 1, "--max-queue must be at least 1", self.max_queue),
                  (self.workers >= 1, "--workers must be at least 1", self.workers),
                  (0 <= self.max_wait_ms < math.inf, "--max-wait-ms must be at least 0 and finite", self.max_wait_ms),
                  (0 < self.timeout_ms < math.inf, "--timeout-ms must be above 0 and finite", self.timeout_ms)]
        for ok, message, value in checks:
            if not ok:  # `not` also refuses NaN
                raise UserError(f"{message}, got {value:g}")


def replica_range(text: str) -> tuple[int, int]:
    """`--replicas N` (N and N) or `MIN-MAX`, both at least 1."""
    import argparse
    low, dash, high = text.partition("-")
    try:
        least, most = int(low), int(high if dash else low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None
    if not 1 <= least <= most:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return least, most


@dataclass(frozen=True)
class RayConfig:
    """`exitwise serve --ray`: how many copies of the server Ray Serve runs, a fixed number or between two that Ray
    Serve's autoscaler chooses from. The autoscaler adds replicas while they average more than `target_ongoing`
    requests in flight each (default: `--max-batch`, a full first-stage batch waiting on every replica: a batching
    server needs requests waiting, where Ray's own default, 2, would scale one up that is barely batching), and
    removes them when they average less. The timing fields are Ray Serve's (None: its defaults, a replica added
    after 30 s above the target and removed after 600 s below it); tests set them short."""
    replicas: tuple[int, int] = option((1, 1), "with --ray: N replicas, or MIN-MAX: Ray Serve's autoscaler keeps "
                                               "between MIN and MAX (default 1)", parse=replica_range)
    target_ongoing: int | None = option(None, "with --ray --replicas MIN-MAX: requests in flight per replica the "
                                              "autoscaler aims at (default: --max-batch)")
    upscale_delay_s: float | None = None
    downscale_delay_s: float | None = None
    look_back_period_s: float | None = None  # above Ray's metrics interval (10 s), which Ray warns it will enforce

    def __post_init__(self) -> None:
        least, most = self.replicas
        if not 1 <= least <= most:
            raise UserError(f"--replicas: expected N or MIN-MAX with 1 <= MIN <= MAX, got {least}-{most}")
        if self.target_ongoing is not None and self.target_ongoing < 1:
            raise UserError(f"--target-ongoing must be at least 1, got {self.target_ongoing}")
        if self.target_ongoing is not None and not self.autoscaled:
            raise UserError("--target-ongoing steers the autoscaler: give --replicas MIN-MAX")

    @property
    def autoscaled(self) -> bool:
        return self.replicas[0] < self.replicas[1]

    def describe(self) -> str:
        least, most = self.replicas
        return f"{least}-{most} replicas, autoscaled" if self.autoscaled else f"{least} replica{'s' * (least > 1)}"


WIRE_FORMATS = ("fp32", "fp16", "int8")  # features between tiers (`deploy.wire`), from the largest to the smallest


@dataclass(frozen=True)
class NextURL:
    """The next tier's URL, parsed: https (TLS) or http, host, port and path prefix."""
    tls: bool
    host: str
    port: int
    prefix: str = ""


def check_url(url: str) -> NextURL:
    """The next tier's http:// or https:// URL, parsed, or a one-line UserError."""
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query
            or parts.fragment):
        raise UserError(f"--next {url!r} is not a URL of the next tier (http://HOST:PORT or https://HOST:PORT)")
    tls = parts.scheme == "https"
    return NextURL(tls, parts.hostname, port or (443 if tls else 80), parts.path.rstrip("/"))


@dataclass(frozen=True)
class ClientTLS:
    """How a tier speaks TLS to an https:// next tier: the certificates that verify the next tier's (`--next-ca`;
    None: the system's), and the certificate with its key that this tier shows it (`--next-cert`, `--next-key`:
    mutual TLS, for a next tier served with `--ssl-ca-certs`)."""
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def check(self, url: str | None) -> None:
        """For `url` (the next tier's; None: there is none): the files load, or a one-line UserError."""
        given = [f for f, v in (("--next-ca", self.ca), ("--next-cert", self.cert), ("--next-key", self.key)) if v]
        if not given:
            return
        if url is None:
            raise UserError(f"{given[0]} goes with --next https://HOST:PORT (a tier that forwards)")
        if not check_url(url).tls:
            raise UserError(f"{given[0]} is for an https:// next tier; {url!r} is plain http")
        check_pair(self.cert, self.key, "--next-cert", "--next-key", server=False)
        self.context()

    def context(self):
        """The `ssl.SSLContext` of a connection to the next tier."""
        import ssl
        try:
            context = ssl.create_default_context(cafile=None if self.ca is None else str(self.ca))
        except (OSError, ssl.SSLError) as e:
            raise UserError(f"--next-ca {str(self.ca)!r}: cannot load certificates from it ({_reason(e)})") from None
        if self.cert is not None:
            context.load_cert_chain(str(self.cert), str(self.key))
        return context


@dataclass(frozen=True)
class ServerTLS:
    """How a server speaks TLS: its certificate (chain) and key (PEM files), and with `ca_certs` only to clients that
    show a certificate those signed (mutual TLS; None: any client)."""
    certfile: Path
    keyfile: Path
    ca_certs: Path | None = None


def check_pair(certfile: Path | None, keyfile: Path | None, cert_flag: str, key_flag: str,
                server: bool = True) -> None:
    """A certificate (chain) and its key, both or neither, as PEM files that load together; or a one-line UserError."""
    if certfile is None and keyfile is None:
        return
    if certfile is None or keyfile is None:
        raise UserError(f"{cert_flag} and {key_flag} go together: give both (PEM files) or neither")
    import ssl
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
            str(certfile), str(keyfile))
    except (OSError, ssl.SSLError) as e:
        raise UserError(f"{cert_flag} {str(certfile)!r} with {key_flag} {str(keyfile)!r}: cannot load a "
                        f"certificate and its key ({_reason(e)})") from None


def _check_client_cas(ca: Path | None, certfile: Path | None) -> None:
    """`--ssl-ca-certs`: with a certificate of the server's own, a PEM file that loads; or a one-line UserError."""
    if ca is None:
        return
    if certfile is None:
        raise UserError("--ssl-ca-certs checks clients' certificates over TLS: give --ssl-certfile and --ssl-keyfile")
    import ssl
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    except (OSError, ssl.SSLError) as e:
        raise UserError(f"--ssl-ca-certs {str(ca)!r}: cannot load certificates from it ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    return " ".join((getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e) or type(e).__name__).split())


_TIER_NAME = re.compile(r"[A-Za-z0-9_]+\Z")


def check_tier_name(name: str) -> None:
    """A tier's name (`--tier`: in plans, answers and logs): letters, digits and _ only."""
    if not _TIER_NAME.match(name):
        raise UserError(f"tier name {name!r}: use letters, digits and _ only")


@dataclass(frozen=True)
class TierConfig:
    """What makes `exitwise serve` one tier of a chain (`deploy.tiers`): its name, its stages first..last, where
    the survivors go (None: this tier ends the network) and how."""
    name: str
    first: int
    last: int
    next_url: str | None = None
    wire: str = "fp32"
    forward_timeout_ms: float = 5000.0   # the next tier not answering by then: this tier's last exit, degraded
    retry_after_ms: float = 500.0        # after a failure, batches are answered degraded at once for this long
    send_images: bool = False            # send survivors' images, not features (the next recomputes); a later tier
                                         # must then be sent the images itself
    next_tls: ClientTLS = ClientTLS()    # with an https next tier: how to verify it, and what to show it

    def __post_init__(self) -> None:
        check_tier_name(self.name)
        if self.wire not in WIRE_FORMATS:
            raise UserError(f"unknown wire format {self.wire!r}; choose one of {', '.join(WIRE_FORMATS)}")
        if self.next_url is not None:
            check_url(self.next_url)
        self.next_tls.check(self.next_url)
        if not 0 < self.forward_timeout_ms < math.inf:
            raise UserError(f"--forward-timeout-ms must be above 0 and finite, got {self.forward_timeout_ms:g}")
        if not self.retry_after_ms >= 0:
            raise UserError(f"the retry pause must be at least 0 ms, got {self.retry_after_ms:g}")


@dataclass(frozen=True)
class RelayConfig:
    """A tier that holds no stages (`deploy.relay.create_relay_app`): it forwards every request to `next_url`
    unchanged, images before the first tier with stages or features between two, and passes the answers back."""
    name: str
    next_url: str
    timeout_ms: float = 10_000.0   # the next tier not answering by then: 504 (its own degraded answers come sooner)
    next_tls: ClientTLS = ClientTLS()  # with an https next tier: how to verify it, and what to show it

    def __post_init__(self) -> None:
        check_tier_name(self.name)
        check_url(self.next_url)
        self.next_tls.check(self.next_url)
        if not 0 < self.timeout_ms < math.inf:
            raise UserError(f"--forward-timeout-ms must be above 0 and finite, got {self.timeout_ms:g}")


@dataclass(frozen=True)
class ServeConfig:
    """Everything `exitwise serve` sets besides the model."""
    host: str = option("127.0.0.1", "address to listen on (127.0.0.1: this machine only)")
    port: int = option(8000, "port (0: any free port, printed at start)")
    max_body_mb: float = option(16.0, "request bodies over this many MiB get 413")
    access_log: bool = option(False, "one line per request on stdout (client, method, path, status), as uvicorn "
                                     "logs them; off by default: each line is work on the event loop (its cost not measured)")
    processes: int = option(1, "server processes on the one port, each with its own model, batches and 1/N of the "
                               "CPUs' threads: more requests per second, a lone request slower (2 on a 2-core AMD Zen "
                               "4: capacity +6-13%%, a lone request +25-38%%; docs/serve.md)")
    grpc_port: int | None = option(None, "also serve the Open Inference Protocol over gRPC on this port (KServe V2's "
                                         "GRPCInferenceService, as tritonclient.grpc speaks it; 0: any free port, "
                                         "printed at start; pip install 'exitwise[grpc]')")
    ssl_certfile: Path | None = option(None, "serve HTTPS (and gRPC over TLS) with this PEM certificate (chain); "
                                             "with --ssl-keyfile")
    ssl_keyfile: Path | None = option(None, "the PEM private key of --ssl-certfile")
    ssl_ca_certs: Path | None = option(None, "with --ssl-certfile: serve only clients that show a certificate signed "
                                             "by one of these (PEM; mutual TLS), over HTTPS and gRPC")
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tier: TierConfig | None = None       # one tier of a chain (its scheduler runs the tier's stages); None: the whole
    relay: RelayConfig | None = None     # network; relay: a tier with no stages, forwards everything, runs no model

    def __post_init__(self) -> None:
        if self.tier is not None:  # the scheduler runs the tier's stages: one range, given once
            scheduling, stages = self.scheduler, (self.tier.first, self.tier.last)
            if (scheduling.first, scheduling.last) not in ((0, None), stages):
                raise UserError(f"the scheduler's stages {scheduling.first}-{scheduling.last} are not tier "
                                f"{self.tier.name}'s {stages[0]}-{stages[1]}: give the range once, in the tier")
            object.__setattr__(self, "scheduler", dataclasses.replace(scheduling, first=stages[0], last=stages[1]))
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be 0-65535, got {self.port}")
        if not 0 < self.max_body_mb < math.inf:
            raise UserError(f"--max-body-mb must be above 0 and finite, got {self.max_body_mb:g}")
        if self.processes < 1:
            raise UserError(f"--processes must be at least 1, got {self.processes}")
        check_pair(self.ssl_certfile, self.ssl_keyfile, "--ssl-certfile", "--ssl-keyfile")
        _check_client_cas(self.ssl_ca_certs, self.ssl_certfile)
        if self.processes > 1 and self.relay is not None:
            raise UserError("a relay tier runs no model: serve it in one process (drop --processes)")
        if self.grpc_port is not None:
            if not 0 <= self.grpc_port <= 65535 or self.grpc_port == self.port != 0:
                raise UserError(f"--grpc-port must be 0-65535 and not --port, got {self.grpc_port}")
            if self.processes > 1 and self.grpc_port == 0:
                raise UserError("--grpc-port 0 with --processes: give a port, which every process listens on")
            if self.relay is not None:
                raise UserError("--grpc-port: a relay runs no model; give it to the first tier that holds stages")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def tls(self) -> ServerTLS | None:
        """The TLS that --ssl-certfile, --ssl-keyfile and --ssl-ca-certs ask for (None: plain HTTP)."""
        return None if self.ssl_certfile is None else ServerTLS(self.ssl_certfile, self.ssl_keyfile, self.ssl_ca_certs)

    @property
    def scheme(self) -> str:
        """How clients reach this server: https with a certificate, else http."""
        return "https" if self.tls else "http"
