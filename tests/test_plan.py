"""The tier planner: on made-up costs it picks what a hand calculation picks; bad tiers and links are refused."""
import json
import math

import numpy as np
import pytest

from exitwise.deploy.plan import (INT8_SCALE_BYTES, HttpBytes, Link, NetworkCosts, Plan, Tier, placements, plan,
                                  parse_link, parse_tier, reach_shares, WireCost)
from exitwise.deploy.wire import BYTES_PER_VALUE, encode
from exitwise.errors import UserError

# Three stages: 10, 20, 40 ms per image where the study timed them; half the images reach stage 1, a fifth
# stage 2. Stage 0 outputs 1000 values (4000 B in fp32, more than the 3000 B image), stage 1 250 values. HTTP's own
# bytes (headers, the answers) are left out here (0); a test below puts them in.
NO_HTTP = HttpBytes(0, 0)
COSTS = NetworkCosts(stage_seconds=(0.010, 0.020, 0.040), reach=(1.0, 0.5, 0.2), feature_values=(1000, 250),
                     input_bytes=3000, infer_http=NO_HTTP, tier_http=NO_HTTP)
TIERS = (Tier("device", speed=0.25), Tier("cloud"))
LINKS = (Link("device", "cloud", mbps=8, rtt_ms=40),)  # 8 Mbit/s = 1 byte per microsecond

# By hand (ms per image; a crossing costs share x (40 ms + bytes / 1000 bytes per ms)):
#   cloud holds all: compute 10 + .5*20 + .2*40 = 28; every image crosses: 40 + 3 = 43            -> 71.0, 3000 B
#   device 0, cloud 1-2: compute 10/.25 + 10 + 8 = 58; 4000 B of features cross for half:
#       .5*(40 + 4) = 22 (the 3000 B image instead: .5*(40 + 3) = 21.5, and the cloud reruns stage 0
#       for them: .5*10 = 5, so 84.5 ms and 1500 B: fewer bytes, more time)                     -> 80.0, 2000 B
#   device 0-1, cloud 2: compute 40 + .5*20/.25 + 8 = 88; 1000 B of features for a fifth:
#       .2*(40 + 1) = 8.2                                                                         -> 96.2,  200 B
#   device holds all: 40 + 40 + .2*40/.25 = 112; nothing crosses                                  -> 112.0,   0 B
HAND = {((0, 2),): (71.0, 3000), ((0, 0), (1, 2)): (80.0, 2000), ((0, 1), (2, 2)): (96.2, 200), ((0, 2), None): (112.0, 0)}


def _key(stages):
    return tuple(r for r in stages if r) if stages[0] is None else stages


def test_every_candidate_costs_what_the_hand_calculation_says():
    p = plan(TIERS, LINKS, COSTS)
    assert len(p.candidates) == 4
    for c in p.candidates:
        latency, traffic = HAND[_key(c.stages)]
        assert math.isclose(c.latency_ms, latency, rel_tol=1e-9) and math.isclose(c.traffic_bytes, traffic)
    assert p.choice.stages == (None, (0, 2))  # fastest: send every image to the cloud
    assert [x.payload for x in p.candidates[1].links] == ["features"]  # faster than the image and a rerun
    by_traffic = plan(TIERS, LINKS, COSTS, minimize="traffic").candidates[1]  # the image: fewer bytes
    assert [x.payload for x in by_traffic.links] == ["input"]
    assert math.isclose(by_traffic.latency_ms, 84.5) and math.isclose(by_traffic.traffic_bytes, 1500)
    within = plan(TIERS, LINKS, COSTS, minimize="traffic", max_latency_ms=82)  # the image's 84.5 ms is over: features
    assert within.choice.stages == ((0, 0), (1, 2)) and math.isclose(within.choice.traffic_bytes, 2000)


def test_links_carry_the_requests_headers_and_the_answers_back():
    # made-up HTTP bytes: an image's V2 request adds 400 B of headers and gets 600 B back; a tier's features or
    # image request adds 200 B and gets 300 B back. 8 Mbit/s: 1000 B per ms, both ways on the same line.
    costs = NetworkCosts(**{**COSTS.__dict__, "infer_http": HttpBytes(400, 600), "tier_http": HttpBytes(200, 300)})
    # by hand: all-cloud 28 + (40 + (3000 + 400 + 600) / 1000) = 72.0, 4000 B;
    #   device 0, cloud 1-2: 58 + .5*(40 + (4000 + 200 + 300) / 1000) = 80.25, 2250 B (the image: 58 + 5 + .5*43.5
    #   = 84.75); device 0-1, cloud 2: 88 + .2*(40 + (1000 + 500) / 1000) = 96.3, 300 B; device alone 112.0, 0 B
    hand = {((0, 2),): (72.0, 4000), ((0, 0), (1, 2)): (80.25, 2250), ((0, 1), (2, 2)): (96.3, 300),
            ((0, 2), None): (112.0, 0)}
    p = plan(TIERS, LINKS, costs)
    for c in p.candidates:
        latency, traffic = hand[_key(c.stages)]
        assert math.isclose(c.latency_ms, latency) and math.isclose(c.traffic_bytes, traffic)
    assert p.to_json()["costs"]["tier_http"] == {"request": 200, "answer": 300}


def test_minimize_traffic_within_a_latency_bound():
    assert plan(TIERS, LINKS, COSTS, minimize="traffic").choice.stages == ((0, 2), None)
    bounded = plan(TIERS, LINKS, COSTS, minimize="traffic", max_latency_ms=100)
    assert bounded.choice.stages == ((0, 1), (2, 2)) and bounded.choice.wire == "fp32"
    with pytest.raises(UserError, match="fastest takes 71.0 ms"):
        plan(TIERS, LINKS, COSTS, max_latency_ms=50)


def test_a_tie_goes_to_the_placement_with_fewer_tiers_holding_stages():
    # no image reaches stage 2: the device holding everything and the device 0-1 / cloud 2 split both send nothing
    # and take 40 + .5*20/.25 = 80 ms; the split would run a cloud server that never gets an image
    costs = NetworkCosts(**{**COSTS.__dict__, "reach": (1.0, 0.5, 0.0)})
    p = plan(TIERS, LINKS, costs, minimize="traffic")
    split = next(c for c in p.candidates if c.stages == ((0, 1), (2, 2)))
    assert (split.latency_ms, split.traffic_bytes) == (p.choice.latency_ms, p.choice.traffic_bytes) == (80.0, 0)
    assert p.choice.stages == ((0, 2), None)


def test_a_cheaper_wire_format_is_taken_only_within_the_tolerance():
    # int8 changes 0.05% of the answers at the cut after stage 0, 0.08% after stage 1: within 0.1 points
    measured = NetworkCosts(**{**COSTS.__dict__, "wire": WireCost(2000, {"int8": (0.0005, 0.0008)})})
    c = plan(TIERS, LINKS, measured, minimize="traffic", max_latency_ms=100).choice
    # 250 B of int8 features for a fifth of the images: .2 * 250 = 50 B; .2 * (40 + .25) ms on the link
    assert c.wire == "int8" and math.isclose(c.traffic_bytes, 50) and math.isclose(c.latency_ms, 88 + 8.05)
    strict = plan(TIERS, LINKS, measured, minimize="traffic", max_latency_ms=100, wire_tolerance_points=0.05)
    assert strict.choice.wire == "fp32"


def test_int8_features_carry_a_scale_per_channel_with_each_crossing_image():
    # stage 1's output is 10 channels of 25 values; int8 sends one scale per channel with every batch, and the
    # planner pays a crossing per image (a batch of one): .2 * (250 + 10 * INT8_SCALE_BYTES) B over the link
    measured = NetworkCosts(**{**COSTS.__dict__, "wire": WireCost(2000, {"int8": (0.0005, 0.0008)}),
                               "feature_channels": (40, 10)})
    c = plan(TIERS, LINKS, measured, minimize="traffic", max_latency_ms=100).choice
    crossing = 250 + 10 * INT8_SCALE_BYTES
    assert c.wire == "int8" and math.isclose(c.traffic_bytes, .2 * crossing)
    assert math.isclose(c.latency_ms, 88 + .2 * (40 + crossing / 1000))
    # fp32 sends no scales
    strict = plan(TIERS, LINKS, measured, minimize="traffic", max_latency_ms=100, wire_tolerance_points=0.05)
    assert strict.choice.wire == "fp32" and math.isclose(strict.choice.traffic_bytes, .2 * 1000)


def test_the_int8_scale_bytes_are_what_the_wire_format_sends():
    # one image's features, 64 channels whose magnitudes spread over four decades, a few all zero (after a ReLU)
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=(1, 64, 8, 8))) * np.logspace(-2, 2, 64).reshape(1, 64, 1, 1)
    x[:, :4] = 0
    header = {fmt: len(encode(x.astype(np.float32), fmt)) - x.size * BYTES_PER_VALUE[fmt] for fmt in ("int8", "fp32")}
    assert abs((header["int8"] - header["fp32"]) / 64 - INT8_SCALE_BYTES) <= 0.1 * INT8_SCALE_BYTES


def test_placements_cover_every_split_in_order():
    every = placements(3, 3)
    assert len(every) == math.comb(3 + 2, 2)
    for stages in every:
        held = [s for r in stages if r for s in range(r[0], r[1] + 1)]
        assert held == [0, 1, 2]


def test_an_empty_middle_tier_relays_and_each_link_pays():
    tiers = (Tier("device", 0.25), Tier("edge"), Tier("cloud"))
    links = (Link("device", "edge", 8, 10), Link("edge", "cloud", 8, 30))
    c = next(c for c in plan(tiers, links, COSTS).candidates if c.stages == ((0, 1), None, (2, 2)))
    assert [x.cut for x in c.links] == [2, 2]  # the same 1000 B of features cross both links
    assert math.isclose(c.latency_ms, 88 + .2 * (10 + 1) + .2 * (30 + 1))


def test_each_tier_an_image_enters_adds_its_request_or_relay_cost_at_the_share_that_enters_it():
    tiers = (Tier("device", 0.25, request_seconds=0.004, relay_seconds=0.003),
             Tier("edge", request_seconds=0.002, relay_seconds=0.0005), Tier("cloud", request_seconds=0.001))
    links = (Link("device", "edge", 8, 10), Link("edge", "cloud", 8, 30))
    by_stages = {c.stages: c for c in plan(tiers, links, COSTS).candidates}
    split = by_stages[((0, 1), None, (2, 2))]  # device takes every image; 0.2 reach the cloud through the edge relay
    assert math.isclose(split.request_seconds, 0.004 + .2 * 0.0005 + .2 * 0.001)
    assert math.isclose(split.latency_ms, 88 + .2 * (10 + 1) + .2 * (30 + 1) + 4 + .2 * .5 + .2 * 1)
    all_cloud = by_stages[(None, None, (0, 2))]  # two relays pass every image on
    assert math.isclose(all_cloud.request_seconds, 0.003 + 0.0005 + 0.001)
    edge_first = by_stages[(None, (0, 2), None)]  # the cloud after the network's end gets nothing
    assert math.isclose(edge_first.request_seconds, 0.003 + 0.002)


def test_reach_shares_follow_the_exit_rule():
    scores = np.array([[0.1, 0.5, 0.9, 0.15], [0.0, 0.4, 0.9, 0.9]], np.float32)
    assert reach_shares(scores, [0.2, 0.5]) == (1.0, 0.5, 0.25)
    assert reach_shares(scores, [None, None]) == (1.0, 1.0, 1.0)


def test_tier_and_link_syntax():
    assert parse_tier("cloud") == Tier("cloud", 1.0)
    assert parse_tier("device:speed=0.25") == Tier("device", 0.25)
    assert parse_tier("edge:stage-ms=1/2/4") == Tier("edge", stage_seconds=(0.001, 0.002, 0.004))
    for tier in (Tier("edge", stage_seconds=(0.001, 0.0025), request_seconds=0.003, relay_seconds=0.0005),
                 Tier("device", 0.25, request_seconds=0.002)):
        assert parse_tier(f"{tier.name}:{tier.options()}") == tier  # what `plan --measure` prints, read back
    assert parse_tier("edge:stage-ms=1/2/4,request-ms=2") == Tier("edge", stage_seconds=(0.001, 0.002, 0.004),
                                                                  request_seconds=0.002)
    assert parse_tier("cloud:request-ms=0.5") == Tier("cloud", 1.0, request_seconds=0.0005)
    assert parse_tier("edge:relay-ms=2") == Tier("edge", 1.0, relay_seconds=0.002)
    assert parse_link("device-cloud:mbps=20,rtt-ms=40") == Link("device", "cloud", 20, 40)


@pytest.mark.parametrize("text,match", [
    ("device:speed=fast", "not a number"), ("device:speed=0", "positive"), ("device:sped=2", "options"),
    (":speed=1", "NAME"), ("dev-ice", "letters"), ("edge:speed=1,stage-ms=1/2", "not both"),
    ("edge:request-ms=-1", ">= 0"), ("edge:relay-ms=-1", "relay-ms must be")])
def test_bad_tiers_are_refused_in_one_line(text, match):
    with pytest.raises(UserError, match=match):
        parse_tier(text)


@pytest.mark.parametrize("text,match", [
    ("device-cloud", "FROM-TO"), ("device:mbps=2,rtt-ms=1", "FROM-TO"), ("a-b-c:mbps=1,rtt-ms=1", "FROM-TO"),
    ("device-cloud:mbps=-1,rtt-ms=4", "positive"), ("device-cloud:mbps=1", "FROM-TO"),
    ("device-cloud:mbps=1,rtt-ms=x", "not a number")])
def test_bad_links_are_refused_in_one_line(text, match):
    with pytest.raises(UserError, match=match):
        parse_link(text)


@pytest.mark.parametrize("links,match", [
    ((), "no link device-cloud"),
    ((Link("device", "edge", 1, 1),), "no tier named 'edge'"),
    ((Link("cloud", "device", 1, 1),), "consecutive"),
    ((LINKS[0], LINKS[0]), "twice")])
def test_bad_chains_are_refused(links, match):
    with pytest.raises(UserError, match=match):
        plan(TIERS, links, COSTS)


def test_bad_plans_are_refused():
    with pytest.raises(UserError, match="differ"):
        plan((Tier("a"), Tier("a")), (Link("a", "a", 1, 1),), COSTS)
    with pytest.raises(UserError, match="3 stages"):
        plan((Tier("a", stage_seconds=(1.0,)), Tier("b")), (Link("a", "b", 1, 1),), COSTS)
    with pytest.raises(UserError, match="latency or traffic"):
        plan(TIERS, LINKS, COSTS, minimize="energy")
    with pytest.raises(UserError, match="K - 1"):
        NetworkCosts((1.0, 1.0), (1.0, 0.5), (), 10)


def test_a_plan_reads_back_as_it_was_written_and_a_torn_one_is_refused():
    wire = WireCost(500, {"fp16": (0.0, 0.0), "int8": (0.01, 0.0)}, {"fp16": (0.0, 0.0), "int8": (-0.2, 0.0)})
    costs = NetworkCosts(COSTS.stage_seconds, COSTS.reach, COSTS.feature_values, COSTS.input_bytes, wire,
                         feature_channels=(16, 32))
    made = plan((Tier("device", stage_seconds=(0.04, 0.08, 0.16), request_seconds=0.001), Tier("cloud")), LINKS,
                costs, max_latency_ms=200)
    doc = json.loads(json.dumps(made.to_json()))
    again = Plan.from_json(doc)
    assert again.to_json() == doc and again.choice == made.choice and again.tiers == made.tiers
    with pytest.raises(UserError, match="chose candidate 9"):
        Plan.from_json({**doc, "chosen": 9})
    with pytest.raises(UserError, match="do not place 1 tiers"):
        Plan.from_json({**doc, "tiers": doc["tiers"][:1]})


def test_the_planner_runs_without_torch():
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys; sys.modules['torch'] = None\n"
            "from exitwise.deploy.plan import Link, NetworkCosts, Tier, plan\n"
            "costs = NetworkCosts((0.01, 0.02), (1.0, 0.5), (100,), 300)\n"
            "print(plan((Tier('a'), Tier('b')), (Link('a', 'b', 1, 1),), costs).chosen)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr


# Three tiers, one stage each: the device (4x slower than the study's timing), the edge (2x faster), the cloud (10x
# faster); 100 B per ms (0.8 Mbit/s) on both links, RTT 10 and 30 ms. Compute without reruns:
# 10/.25 + .5*20/2 + .2*40/10 = 45.8 ms.
CHAIN = (Tier("device", 0.25), Tier("edge", 2), Tier("cloud", 10))
CHAIN_LINKS = (Link("device", "edge", 0.8, 10), Link("edge", "cloud", 0.8, 30))
ONE_EACH = ((0, 0), (1, 1), (2, 2))


def test_the_image_crosses_the_second_link_where_that_is_cheaper():
    # stage 1's output (900 values: 3600 B in fp32) is larger than the 3000 B image too. By hand (ms per image):
    #   features on both links: 45.8 + .5*(10 + 40) + .2*(30 + 36)                                    = 84.0
    #   the image to the edge (it reruns stage 0: .5*10/2 = 2.5), then features: 45.8 + 2.5 + .5*(10 + 30)
    #       + .2*(30 + 36)                                                                            = 81.5
    #   the image on both links (the cloud reruns stages 0-1 too: .2*(10 + 20)/10 = .6):
    #       45.8 + 2.5 + .6 + .5*(10 + 30) + .2*(30 + 30)                                             = 80.9
    costs = NetworkCosts(**{**COSTS.__dict__, "feature_values": (1000, 900)})
    c = next(c for c in plan(CHAIN, CHAIN_LINKS, costs).candidates if c.stages == ONE_EACH)
    assert [x.payload for x in c.links] == ["input", "input"]
    assert math.isclose(c.latency_ms, 80.9) and [x.bytes for x in c.links] == [0.5 * 3000, 0.2 * 3000]


def test_features_smaller_than_the_image_cross_the_second_link():
    # stage 1's output 500 values (2000 B): features on both links 45.8 + 25 + .2*(30 + 20) = 80.8; the image to the
    # edge, then features: 45.8 + 2.5 + 20 + 10 = 78.3; the image on both: 80.9 (above)
    costs = NetworkCosts(**{**COSTS.__dict__, "feature_values": (1000, 500)})
    c = next(c for c in plan(CHAIN, CHAIN_LINKS, costs).candidates if c.stages == ONE_EACH)
    assert [x.payload for x in c.links] == ["input", "features"] and math.isclose(c.latency_ms, 78.3)
    assert [x.bytes for x in c.links] == [0.5 * 3000, 0.2 * 2000]


def test_stages_are_timed_without_garbage_collection_which_is_then_back_on():
    import gc

    from exitwise.deploy.measure import measure_stages
    collecting = []

    class Stages:  # what measure_stages needs of an OnnxEarlyExit
        input_shape, num_exits = (3, 4, 4), 2

        def run_stage(self, k, x):
            collecting.append(gc.isenabled())
            return x, None

    assert gc.isenabled()
    seconds = measure_stages(Stages(), repeats=3, seconds=0)
    assert len(seconds) == 2 and all(s >= 0 for s in seconds)
    assert collecting == [True, False, False, False] * 2  # each stage's untimed call, then its timed ones
    assert gc.isenabled()
