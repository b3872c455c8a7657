"""The tier planner: where to cut a multi-exit network across tiers (device, edge, cloud), from measured costs.

A pure function of typed inputs (`plan`); the cost model (also in docs/tiers.md), per image, in expectation:

* a placement gives each tier, in order, a contiguous range of stages, possibly none. Every way of cutting
  stages 0..K-1 into such ranges is a candidate: cut c_i is the number of stages on tiers 0..i. A tier with
  no stages before the first stage relays the input; tiers after the last stage receive nothing (the network
  ends at the last tier holding stages).
* compute: stage k runs for the share `reach[k]` of images that did not leave before it, at the per-sample
  seconds of the tier holding it (measured there, or the study's times divided by the tier's relative speed).
  The study's times are per-sample times at its batch size, so a tier's batching is in them.
* link i (tier i -> tier i + 1) at cut c: c = K carries nothing; c = 0 carries every input image (a binary V2
  infer request); else the survivors (share reach[c]) cross (a `POST /v2/tiers/features`), each paying the link's
  round trip plus its bytes both ways over the bandwidth: reach[c] * (RTT + bytes * 8 / bandwidth). The bytes are
  the payload (stage c-1's output in the wire format, with int8's scales for a batch of one, or the original image
  as uint8 pixels), the request's HTTP headers and framing, and the answer coming back (`HttpBytes`, measured:
  `INFER_HTTP`, `TIER_HTTP`).
* images or features: a tier has the images only if every link before it carried them (the first tier holding
  stages always has them), so the images can cross a leading run of the cuts; each cut that gets them sends the
  image instead of the features, and the tier holding stage c first reruns stages 0..c-1 for the survivors
  (charged at its speed with their heads' time included: an upper bound). Per placement the planner takes the
  run (none, the first cut, the first two, ...) that is cheapest by the plan's rule (`minimize`, within
  `max_latency_ms` where one is); ties go to features. Queueing and the wait for a batch to fill are not modelled.
* requests: each tier an image enters adds its `request_seconds` (HTTP, decoding, the answer) where it holds
  stages, its `relay_seconds` (passing the request on and the answer back) where it holds none: the first tier
  for every image, each later tier for the share crossing to it.
* wire format: per candidate the smallest format (int8, then fp16, then fp32) whose measured disagreement with
  fp32, summed over the cuts where it carries features, is at most the tolerance (default 0.1 points);
  unmeasured formats are never chosen; fp32 is exact.
* choice: the candidate with the lowest expected latency (or the fewest bytes over all links, with
  `minimize="traffic"`) among those within `max_latency_ms`; ties go to the other quantity, then to the
  placement with fewer tiers holding stages (a tier given only stages no image reaches would be a server for
  nothing), then to the earlier candidate.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import check_tier_name
from ..errors import UserError
from ..io import read_format_json
from ..records import from_json, to_json
from ..exit_rule import as_thresholds, leaves
from .manifest import Manifest
from .onnx_runtime import Policy
from .wire import BYTES_PER_VALUE, FORMATS, SCALE_DTYPE

PLAN_FORMAT = "exitwise.tier-plan/1"
WIRE_TOLERANCE_POINTS = 0.1   # largest disagreement with fp32 (percentage points) a cheaper wire format may add
MINIMIZE = ("latency", "traffic")
CHEAPEST_FIRST = tuple(reversed(FORMATS))   # int8, fp16, fp32


@dataclass(frozen=True)
class HttpBytes:
    """What one request of one image across a link adds to its payload: `request`, its request line, headers and
    framing (beyond the image's pixels or the features' values), and `answer`, the whole answer coming back
    (status line, headers, body)."""
    request: int
    answer: int

    def __post_init__(self) -> None:
        if min(self.request, self.answer) < 0:
            raise UserError(f"HTTP bytes must be >= 0, got {self.request} and {self.answer}")

    def to_json(self) -> dict:
        return asdict(self)


# Measured (docs/tiers.md; tests/test_tiers.py checks them against a real chain): the bytes each way of one-image
# requests through a counting TCP relay on 127.0.0.1, exitwise's own servers on both ends (headers of a few bytes
# more or less with a longer host name, tier name or model name).
INFER_HTTP = HttpBytes(request=330, answer=420)  # cut 0: a binary V2 infer request as a relay passes it on; its JSON
TIER_HTTP = HttpBytes(request=220, answer=140)   # later cuts: `POST /v2/tiers/features`, one row and its answer
# int8's scales, one per channel per batch, travel before the values (`wire.encode`; tests/test_plan.py checks it)
INT8_SCALE_BYTES = SCALE_DTYPE.itemsize


@dataclass(frozen=True)
class Tier:
    """A machine in the chain: its name, its speed relative to the machine the study timed on, or its own
    measured per-sample seconds per stage (which then win); and what taking one image in costs it beyond its stages
    (the request: HTTP, decoding, the answer; measured by `exitwise plan --measure`, 0 unless given), or, where it
    holds no stages, what passing one request on and its answer back costs it (a relay; 0 unless given)."""
    name: str
    speed: float = 1.0
    stage_seconds: tuple[float, ...] | None = None
    request_seconds: float = 0.0
    relay_seconds: float = 0.0

    def __post_init__(self) -> None:
        check_tier_name(self.name)
        if not (math.isfinite(self.speed) and self.speed > 0):
            raise UserError(f"tier {self.name}: speed must be a positive number, got {self.speed}")
        if self.stage_seconds is not None and not all(math.isfinite(s) and s >= 0 for s in self.stage_seconds):
            raise UserError(f"tier {self.name}: stage times must be non-negative numbers")
        for option, seconds in (("request-ms", self.request_seconds), ("relay-ms", self.relay_seconds)):
            if not (math.isfinite(seconds) and seconds >= 0):
                raise UserError(f"tier {self.name}: {option} must be a number >= 0, got {1000 * seconds}")

    def to_json(self) -> dict:
        return asdict(self) | {"stage_seconds": list(self.stage_seconds) if self.stage_seconds else None}

    def options(self) -> str:
        """What follows `NAME:` in `--tier` to give this tier back (`parse_tier`)."""
        costs = ([f"stage-ms={'/'.join(f'{1000 * s:.4g}' for s in self.stage_seconds)}"] if self.stage_seconds
                 else [f"speed={self.speed:g}"])
        return ",".join(costs + [f"request-ms={1000 * self.request_seconds:.4g}",
                                 f"relay-ms={1000 * self.relay_seconds:.4g}"])


@dataclass(frozen=True)
class Link:
    """The network between two consecutive tiers: bandwidth in Mbit/s (10^6 bits) and round-trip time in ms."""
    source: str
    target: str
    mbps: float
    rtt_ms: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mbps) and self.mbps > 0):
            raise UserError(f"link {self.source}-{self.target}: mbps must be a positive number, got {self.mbps}")
        if not (math.isfinite(self.rtt_ms) and self.rtt_ms >= 0):
            raise UserError(f"link {self.source}-{self.target}: rtt-ms must be a number >= 0, got {self.rtt_ms}")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WireCost:
    """The measured cost of the lossy wire formats: per format, per cut (after stage 0, 1, ..., K-2)."""
    images: int
    disagreement: dict[str, tuple[float, ...]]  # format -> shares of images whose exit or prediction differs from fp32's
    accuracy_change_points: dict[str, tuple[float, ...]] | None = None  # format -> accuracy minus fp32's, in points
                                                                        # (measured with labels)

    def to_json(self) -> dict:
        return to_json(self)


@dataclass(frozen=True)
class NetworkCosts:
    """What the planner knows of the network: K stages, per sample."""
    stage_seconds: tuple[float, ...]     # (K,) seconds of stage k and its head, on the machine the study timed on
    reach: tuple[float, ...]             # (K,) share of images that run stage k at the chosen thresholds
    feature_values: tuple[int, ...]      # (K - 1,) values in stage k's output (what a cut after stage k sends)
    input_bytes: int                     # the original image: uint8 pixels
    wire: WireCost | None = None         # the lossy formats' measured cost; without it only fp32 is used
    infer_http: HttpBytes = INFER_HTTP   # what an image's request adds at cut 0 (the first tier relays it)
    tier_http: HttpBytes = TIER_HTTP     # what a crossing adds at a later cut (features or the image)
    feature_channels: tuple[int, ...] | None = None  # (K - 1,) channels of stage k's output (int8 sends a scale
                                                     # for each); None: not known, no scales counted

    def __post_init__(self) -> None:
        k = len(self.stage_seconds)
        if k < 1 or len(self.reach) != k or len(self.feature_values) != k - 1:
            raise UserError(f"network costs disagree: {k} stage times, {len(self.reach)} reach shares, "
                            f"{len(self.feature_values)} feature sizes (need K, K and K - 1)")
        if self.feature_channels is not None and len(self.feature_channels) != k - 1:
            raise UserError(f"network costs disagree: {len(self.feature_channels)} channel counts for {k} stages "
                            f"(need K - 1)")
        for fmt, shares in (self.wire.disagreement if self.wire else {}).items():
            if fmt not in FORMATS or len(shares) != k - 1:
                raise UserError(f"wire disagreement for {fmt!r}: need one share per cut ({k - 1})")

    @property
    def num_stages(self) -> int:
        return len(self.stage_seconds)

    def to_json(self) -> dict:
        return {"stage_seconds": list(self.stage_seconds), "reach": list(self.reach),
                "feature_values": list(self.feature_values), "input_bytes": self.input_bytes,
                "wire": self.wire.to_json() if self.wire else None, "infer_http": self.infer_http.to_json(),
                "tier_http": self.tier_http.to_json(),
                "feature_channels": list(self.feature_channels) if self.feature_channels is not None else None}


@dataclass(frozen=True)
class Crossing:
    """What one link carries per image, in expectation."""
    cut: int            # stages held before the link (0: the input; K: nothing crosses)
    payload: str        # "input", "features" or "nothing"
    share: float        # of images that cross
    bytes: float        # expected bytes per image, both ways: share x (payload + request headers + answer)
    seconds: float      # expected seconds per image: share x RTT + bytes / bandwidth

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Candidate:
    """One placement: each tier's [first, last] stages (None: none), its wire format and predicted costs."""
    stages: tuple[tuple[int, int] | None, ...]
    wire: str
    wire_disagreement: float       # share of images whose answer may change by the wire format (upper bound)
    compute_seconds: float
    links: tuple[Crossing, ...]
    request_seconds: float = 0.0   # the tiers' request (or relay) costs: the first tier's, each receiving tier's x share

    @property
    def latency_ms(self) -> float:
        return 1000 * (self.compute_seconds + self.request_seconds + sum(c.seconds for c in self.links))

    @property
    def traffic_bytes(self) -> float:
        return sum(c.bytes for c in self.links)

    def to_json(self) -> dict:
        return {"stages": [list(r) if r else None for r in self.stages], "wire": self.wire,
                "wire_disagreement": self.wire_disagreement, "compute_seconds": self.compute_seconds,
                "request_seconds": self.request_seconds,
                "latency_ms": self.latency_ms, "traffic_bytes": self.traffic_bytes,
                "links": [c.to_json() for c in self.links]}


@dataclass(frozen=True)
class Plan:
    """Every candidate and the chosen one: what `exitwise plan` writes and `exitwise serve --plan` reads."""
    tiers: tuple[Tier, ...]
    links: tuple[Link, ...]
    costs: NetworkCosts
    minimize: str
    max_latency_ms: float | None
    wire_tolerance_points: float
    candidates: tuple[Candidate, ...]
    chosen: int

    @property
    def choice(self) -> Candidate:
        return self.candidates[self.chosen]

    def to_json(self) -> dict:
        return {"format": PLAN_FORMAT, "minimize": self.minimize, "max_latency_ms": self.max_latency_ms,
                "wire_tolerance_points": self.wire_tolerance_points,
                "tiers": [t.to_json() for t in self.tiers], "links": [l.to_json() for l in self.links],
                "costs": self.costs.to_json(), "chosen": self.chosen, "choice": self.choice.to_json(),
                "candidates": [c.to_json() for c in self.candidates]}

    @classmethod
    def from_json(cls, doc: dict) -> Plan:
        """A plan as `to_json` wrote it (`choice` and the candidates' totals are derived, so not read); every
        record checked again as when it was made."""
        def ranges(stages):
            return tuple(tuple(r) if r else None for r in stages)

        def tier(t):
            return Tier(**{**t, "stage_seconds": tuple(t["stage_seconds"]) if t.get("stage_seconds") else None})

        costs = doc["costs"]
        wire = costs.get("wire")
        network = NetworkCosts(
            tuple(costs["stage_seconds"]), tuple(costs["reach"]), tuple(costs["feature_values"]), costs["input_bytes"],
            from_json(WireCost, wire) if wire else None,
            **{k: HttpBytes(**costs[k]) for k in ("infer_http", "tier_http") if costs.get(k)},
            **({"feature_channels": tuple(costs["feature_channels"])} if costs.get("feature_channels") else {}))
        candidates = tuple(Candidate(ranges(c["stages"]), c["wire"], c["wire_disagreement"], c["compute_seconds"],
                                     tuple(Crossing(**x) for x in c["links"]), c.get("request_seconds", 0.0))
                           for c in doc["candidates"])
        tiers, links, chosen = tuple(map(tier, doc["tiers"])), tuple(Link(**l) for l in doc["links"]), doc["chosen"]
        if any(len(c.stages) != len(tiers) or len(c.links) != len(links) for c in candidates):
            raise UserError(f"the plan's candidates do not place {len(tiers)} tiers over {len(links)} links")
        if not 0 <= chosen < len(candidates):
            raise UserError(f"the plan chose candidate {chosen} of {len(candidates)}")
        return cls(tiers, links, network, doc["minimize"], doc["max_latency_ms"], doc["wire_tolerance_points"],
                   candidates, chosen)


def placements(num_stages: int, num_tiers: int) -> list[tuple[tuple[int, int] | None, ...]]:
    """Every way to give tiers, in order, contiguous (possibly empty) ranges covering stages 0..K-1."""
    out = []
    for cuts in itertools.combinations_with_replacement(range(num_stages + 1), num_tiers - 1):
        bounds = (0, *cuts, num_stages)
        out.append(tuple((a, b - 1) if b > a else None for a, b in zip(bounds, bounds[1:])))
    return out


def _tier_seconds(tier: Tier, costs: NetworkCosts) -> np.ndarray:
    if tier.stage_seconds is not None:
        if len(tier.stage_seconds) != costs.num_stages:
            raise UserError(f"tier {tier.name}: {len(tier.stage_seconds)} stage times for {costs.num_stages} stages")
        return np.asarray(tier.stage_seconds, dtype=np.float64)
    return np.asarray(costs.stage_seconds, dtype=np.float64) / tier.speed


def _wire_for(cuts: Sequence[int], costs: NetworkCosts, tolerance_points: float) -> tuple[str, float]:
    """The cheapest format whose disagreement summed over the feature cuts is within the tolerance (fp32 where no
    features cross)."""
    if not cuts:
        return "fp32", 0.0
    for fmt in CHEAPEST_FIRST:
        if fmt == "fp32":
            return fmt, 0.0
        shares = costs.wire.disagreement.get(fmt) if costs.wire else None
        if shares is not None:
            total = float(sum(shares[c - 1] for c in cuts))
            if 100 * total <= tolerance_points + 1e-12:
                return fmt, total
    raise AssertionError("unreachable")


def _rank(c: Candidate, minimize: str) -> tuple[float, float]:
    """A candidate's place by the plan's rule: (latency, traffic) or (traffic, latency), lower first."""
    return (c.latency_ms, c.traffic_bytes) if minimize == "latency" else (c.traffic_bytes, c.latency_ms)


def _holding(c: Candidate) -> int:
    """How many tiers a placement runs stages on (servers to deploy)."""
    return sum(r is not None for r in c.stages)


def candidate(stages: tuple[tuple[int, int] | None, ...], tiers: Sequence[Tier], links: Sequence[Link],
              costs: NetworkCosts, tolerance_points: float = WIRE_TOLERANCE_POINTS,
              minimize: str = "latency", max_latency_ms: float | None = None) -> Candidate:
    """The predicted costs of one placement (see the module's docstring): of the ways to send the images across a
    leading run of its cuts (none, the first, the first two, ...), the cheapest by `minimize`, within
    `max_latency_ms` where one is."""
    k = costs.num_stages
    cuts = [r[1] + 1 if r else None for r in stages[:-1]]
    for i in range(len(cuts)):  # an empty tier's cut is the one before it
        cuts[i] = cuts[i] if cuts[i] is not None else (cuts[i - 1] if i else 0)
    inner = sorted({c for c in cuts if 0 < c < k})
    options = [_costed(stages, cuts, set(inner[:n]), tiers, links, costs, tolerance_points)
               for n in range(len(inner) + 1)]
    def over(c: Candidate) -> bool:
        return max_latency_ms is not None and c.latency_ms > max_latency_ms

    return min(options, key=lambda c: (over(c), *_rank(c, minimize)))  # ties: the fewest image cuts (the first)


def _costed(stages: tuple[tuple[int, int] | None, ...], cuts: Sequence[int], image_cuts: set[int],
            tiers: Sequence[Tier], links: Sequence[Link], costs: NetworkCosts, tolerance_points: float) -> Candidate:
    """One placement's costs where the cuts in `image_cuts` (and cut 0) send the image and the others features."""
    k = costs.num_stages
    reach = np.asarray(costs.reach, dtype=np.float64)
    feature_cuts = sorted({c for c in cuts if 0 < c < k} - image_cuts)
    wire, disagreement = _wire_for(feature_cuts, costs, tolerance_points)
    holder = {s: i for i, r in enumerate(stages) if r for s in range(r[0], r[1] + 1)}
    compute = sum(reach[s] * _tier_seconds(tiers[holder[s]], costs)[s] for s in range(k))
    for c in image_cuts:  # the tier holding stage c first reruns stages 0..c-1 for the survivors
        compute += reach[c] * _tier_seconds(tiers[holder[c]], costs)[:c].sum()

    def cost_of(tier: int) -> float:  # what taking a request in costs a tier: with stages, or as a relay
        return tiers[tier].request_seconds if stages[tier] else tiers[tier].relay_seconds

    crossings, requests = [], cost_of(0)
    for i, (c, link) in enumerate(zip(cuts, links)):
        if c == k:
            crossings.append(Crossing(c, "nothing", 0.0, 0.0, 0.0))
            continue
        share = float(reach[c]) if c else 1.0
        requests += share * cost_of(i + 1)
        images = c == 0 or c in image_cuts
        payload = costs.input_bytes if images else feature_bytes(costs, c, wire)
        http = costs.infer_http if c == 0 else costs.tier_http
        size = share * (payload + http.request + http.answer)
        seconds = share * link.rtt_ms / 1000 + size * 8 / (link.mbps * 1e6)
        crossings.append(Crossing(c, "input" if images else "features", share, size, seconds))
    return Candidate(stages, wire, disagreement, float(compute), tuple(crossings), float(requests))


def feature_bytes(costs: NetworkCosts, cut: int, wire: str) -> int:
    """Bytes of the features crossing `cut` for one image in `wire`: their values, and int8's scales (one per
    channel, sent with each batch: here a batch of one, as the planner pays the RTT and headers per image)."""
    scales = costs.feature_channels[cut - 1] * INT8_SCALE_BYTES if wire == "int8" and costs.feature_channels else 0
    return costs.feature_values[cut - 1] * BYTES_PER_VALUE[wire] + scales


def check_chain(tiers: Sequence[Tier], links: Sequence[Link]) -> tuple[Link, ...]:
    """The links in tier order, one per consecutive pair; anything else is a UserError naming the problem."""
    names = [t.name for t in tiers]
    if not tiers:
        raise UserError("give at least one --tier")
    if len(set(names)) != len(names):
        raise UserError(f"tier names must differ: {', '.join(names)}")
    by_pair = {}
    for link in links:
        for end in (link.source, link.target):
            if end not in names:
                raise UserError(f"link {link.source}-{link.target}: no tier named {end!r} (tiers: {', '.join(names)})")
        pair = (link.source, link.target)
        if names.index(link.target) != names.index(link.source) + 1:
            raise UserError(f"link {link.source}-{link.target}: links join consecutive tiers, in order "
                            f"({' -> '.join(names)})")
        if pair in by_pair:
            raise UserError(f"link {link.source}-{link.target} given twice")
        by_pair[pair] = link
    missing = [f"{a}-{b}" for a, b in zip(names, names[1:]) if (a, b) not in by_pair]
    if missing:
        raise UserError(f"no link {', '.join(missing)}: give --link {missing[0]}:mbps=M,rtt-ms=R")
    return tuple(by_pair[p] for p in zip(names, names[1:]))


def plan(tiers: Sequence[Tier], links: Sequence[Link], costs: NetworkCosts, *, minimize: str = "latency",
         max_latency_ms: float | None = None, wire_tolerance_points: float = WIRE_TOLERANCE_POINTS) -> Plan:
    """Every placement of the stages on `tiers` with its predicted latency and traffic, and the best one."""
    if minimize not in MINIMIZE:
        raise UserError(f"--minimize {minimize!r}: choose latency or traffic")
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise UserError(f"--max-latency-ms must be positive, got {max_latency_ms}")
    if not 0 <= wire_tolerance_points <= 100:
        raise UserError(f"--wire-tolerance is in percentage points, 0-100, got {wire_tolerance_points:g}")
    links = check_chain(tiers, links)
    for t in tiers:
        _tier_seconds(t, costs)
    candidates = tuple(candidate(p, tiers, links, costs, wire_tolerance_points, minimize, max_latency_ms)
                       for p in placements(costs.num_stages, len(tiers)))
    allowed = [i for i, c in enumerate(candidates) if max_latency_ms is None or c.latency_ms <= max_latency_ms]
    if not allowed:
        fastest = min(c.latency_ms for c in candidates)
        raise UserError(f"no placement meets --max-latency-ms {max_latency_ms:g} (the fastest takes {fastest:.1f} ms)")

    return Plan(tuple(tiers), links, costs, minimize, max_latency_ms, wire_tolerance_points, candidates,
                min(allowed, key=lambda i: (*_rank(candidates[i], minimize), _holding(candidates[i]), i)))


# Command-line syntax: --tier NAME[:speed=S | :stage-ms=a/b/c], --link A-B:mbps=M,rtt-ms=R

def _options(text: str, what: str, allowed: Sequence[str]) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed or key in options:
            raise UserError(f"{what} {text!r}: expected {'/'.join(allowed)}=VALUE options, got {item!r}")
        options[key] = value
    return name, options


def _number(value: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UserError(f"{where}: {value!r} is not a number") from None


def parse_tier(text: str) -> Tier:
    """`cloud`, `device:speed=0.25` (4x slower than where the study timed) or `edge:stage-ms=0.1/0.2/...`."""
    name, options = _options(text, "--tier", ("speed", "stage-ms", "request-ms", "relay-ms"))
    if not name:
        raise UserError(f"--tier {text!r}: expected NAME[:speed=S] or NAME:stage-ms=a/b/...[,request-ms=R][,relay-ms=R]")
    if "speed" in options and "stage-ms" in options:
        raise UserError(f"--tier {text!r}: give speed or stage-ms, not both")
    request, relay = (_number(options.get(o, "0"), f"--tier {text!r}") / 1000 for o in ("request-ms", "relay-ms"))
    if "stage-ms" in options:
        ms = tuple(_number(v, f"--tier {text!r}") for v in options["stage-ms"].split("/"))
        return Tier(name, stage_seconds=tuple(m / 1000 for m in ms), request_seconds=request, relay_seconds=relay)
    return Tier(name, _number(options.get("speed", "1"), f"--tier {text!r}"), request_seconds=request,
                relay_seconds=relay)


def parse_link(text: str) -> Link:
    """`device-cloud:mbps=20,rtt-ms=40`."""
    pair, options = _options(text, "--link", ("mbps", "rtt-ms"))
    ends = pair.split("-")
    if len(ends) != 2 or not all(ends) or set(options) != {"mbps", "rtt-ms"}:
        raise UserError(f"--link {text!r}: expected FROM-TO:mbps=M,rtt-ms=R")
    return Link(ends[0], ends[1], _number(options["mbps"], f"--link {text!r}"),
                _number(options["rtt-ms"], f"--link {text!r}"))


_SHORT = {"input": "image", "features": "feat", "nothing": ""}


def format_candidates(p: Plan) -> str:
    """Every candidate as a table row: each tier's stages, the wire format, latency, bytes per link."""
    names = [t.name for t in p.tiers]
    link_names = [f"{l.source}->{l.target}" for l in p.links]
    head = "  ".join(f"{n:>8s}" for n in names) + f"  {'wire':>4s}  {'ms/img':>8s}  " + \
        "  ".join(f"{n + ' B/img':>16s}" for n in link_names)
    rows = [f"   {head}"]
    for i, c in enumerate(p.candidates):
        stages = "  ".join(f"{(f'{r[0]}-{r[1]}' if r else '-'):>8s}" for r in c.stages)
        traffic = "  ".join(f"{x.bytes:>10.0f} {_SHORT[x.payload]:>5s}" for x in c.links)
        rows.append(f"{'*' if i == p.chosen else ' '}  {stages}  {c.wire:>4s}  {c.latency_ms:8.2f}  {traffic}")
    return "\n".join(rows)


def read_plan(path: str | Path) -> Plan:
    """A plan.json (for `exitwise serve --plan`); refused in one line when it is not one or not whole."""
    doc = read_format_json(path, PLAN_FORMAT, "tier plan")
    try:
        return Plan.from_json(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{str(path)!r} is not a whole tier plan ({type(e).__name__}: {e})") from None


# Inputs from a study (its validation logits, thresholds and stage times) and an export (feature shapes, stages);
# the files are read by the caller (`exitwise plan`: study.logits_cache, early_exit.json)

def exit_scores(logits: np.ndarray, policy: str, temperatures: Sequence[float] | None) -> np.ndarray:
    """(K - 1, N) side-exit scores of a (K, N, C) stack of logits, with the export runner's numpy policy."""
    rule = Policy(policy, tuple(temperatures) if temperatures else None)
    state, scores = rule.init_state(logits.shape[1]), []
    for k in range(logits.shape[0] - 1):
        s, state = rule.step(k, logits[k], state)
        scores.append(s)
    return np.stack(scores) if scores else np.empty((0, logits.shape[1]), np.float32)


def reach_shares(scores: np.ndarray, thresholds: Sequence[float | None]) -> tuple[float, ...]:
    """Share of images that run each of the K stages: those that did not leave (`exit_rule.leaves`) before it."""
    thr, staying, reach = as_thresholds(list(thresholds), len(scores) + 1), np.ones(scores.shape[1], bool), [1.0]
    for k in range(len(scores)):
        staying &= ~leaves(scores[k], thr[k])
        reach.append(float(staying.mean()))
    return tuple(reach)


@dataclass(frozen=True)
class FeatureShapes:
    """What can cross each cut: the values in each stage's output but the last, one input image's bytes as uint8
    pixels, and the channels of each stage's output but the last (int8's scales are per channel)."""
    values: tuple[int, ...]
    input_bytes: int
    channels: tuple[int, ...]

    @classmethod
    def of(cls, input_shape: Sequence[int], outputs: Sequence[Sequence[int]]) -> FeatureShapes:
        """From one sample's input shape (C, H, W) and each stage's output shape for one sample, but the last's."""
        return cls(tuple(int(np.prod(o)) for o in outputs), int(np.prod(input_shape)),
                   tuple(int(o[0]) if len(o) else 1 for o in outputs))


def export_shapes(manifest: Manifest) -> FeatureShapes:
    """The feature shapes an export's manifest records."""
    return FeatureShapes.of(manifest.input.shape[1:], [g.output_shape[1:] for g in manifest.stages[:-1]])


def study_costs(val_logits: np.ndarray, stage_seconds: Sequence[float], shapes: FeatureShapes, *, policy: str,
                thresholds: Sequence[float | None], temperatures: Sequence[float] | None = None,
                wire: WireCost | None = None) -> NetworkCosts:
    """The planner's inputs from a study: its validation logits (K, N, C) and per-sample stage times, and the reach
    of each stage at the exit setting the tiers will serve (`policy`, `thresholds` (None or -inf: never leave),
    `temperatures`: an early_exit.json's, or an export's manifest's)."""
    k = len(stage_seconds)
    if val_logits.ndim != 3 or val_logits.shape[0] != k or len(shapes.values) != k - 1:
        raise UserError(f"the study has {val_logits.shape[0]} exits and {k} stage times; the model has "
                        f"{len(shapes.values) + 1} stages")
    if len(thresholds) != k - 1:
        raise UserError(f"the exit setting needs {k - 1} thresholds, one per side exit")
    reach = reach_shares(exit_scores(val_logits.astype(np.float32), policy, temperatures), thresholds)
    return NetworkCosts(tuple(float(s) for s in stage_seconds), reach, shapes.values, shapes.input_bytes, wire,
                        feature_channels=shapes.channels)
