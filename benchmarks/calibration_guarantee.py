"""Do calibrated thresholds keep their promise on new images? 100 random half/half splits of CIFAR-10 test.

    python benchmarks/calibration_guarantee.py [--model seed-branchynet] [--weights FILE] [--data FILE]
                                               [--splits 100] [--delta 0.1] [--policy entropy]

Every exit's logits on the 10k test images are computed once. Each split calibrates on one half
(5000 images) and tests on the other, for targets 0.70 and (final-exit accuracy on all 10k - 1 point).
Per method it prints how often the test accuracy fell below the target, the mean test accuracy and
the mean MACs per image. Methods: empirical (cheapest setting meeting the target on the calibration
half), guaranteed (Learn then Test at delta for the accuracy over the 5000 test images; must fail in
at most delta of the splits), guaranteed for the expected accuracy (the same, for infinitely many new
images: a finite test half misses it more often), and the founding per-exit percentile rule.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from exitwise.study import analysis, calibration
from exitwise.api import load_model
from exitwise.models.costs import exit_macs
from exitwise.data import load_splits
from exitwise.policies import get_policy
from exitwise.study.results import SearchResult
from exitwise.device import machine
from exitwise.tune import choose_precision
from exitwise.runtime import all_exit_logits, prepare

SHARED = Path(__file__).resolve().parents[2] / "shared"


def thresholds_per_method(scores, correct, macs, target: float, delta: float, test_size: int, max_score: float,
                          seed: int) -> dict[str, np.ndarray | None]:
    """Each method's thresholds from the calibration half, None where it reports the target unreachable."""
    def ok(result: SearchResult) -> np.ndarray | None:
        return None if result.status != "ok" else np.asarray(result.thresholds)
    return {
        "empirical": ok(calibration.empirical_thresholds(scores, correct, macs, target)),
        "guaranteed": ok(calibration.guaranteed_thresholds(scores, correct, macs, target, delta,
                                                           test_size=test_size, seed=seed)),
        "guaranteed, expected accuracy": ok(calibration.guaranteed_thresholds(scores, correct, macs, target, delta,
                                                                              seed=seed)),
        "founding seed-percentile": calibration.seed_percentile(scores, correct, target, max_score),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED / "data/cifar10-jpg.tar.gz")
    p.add_argument("--model", default="seed-branchynet")
    p.add_argument("--weights", type=Path, default=SHARED / "seed/cifar10_branchyNet_m.h5")
    p.add_argument("--splits", type=int, default=100)
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--policy", default="entropy")
    p.add_argument("--precision", default="auto", help="auto (measured here), bf16, mixed or fp32")
    args = p.parse_args()

    data = load_splits("cifar10", args.data, progress=False).test
    model, _ = load_model(args.model, args.weights)
    policy = get_policy(args.policy)
    precision, _ = choose_precision(model, data, args.precision)
    print(f"machine: {machine().describe()}; precision {precision}")
    start = time.perf_counter()
    logits = all_exit_logits(prepare(model, precision), data).logits
    print(f"{args.model}: every exit's logits on {len(data)} test images in {time.perf_counter() - start:.1f} s")
    scores = policy.scores(torch.from_numpy(logits)).numpy().astype(np.float64)
    correct = logits.argmax(-1) == data.labels.numpy()[None, :]
    macs = np.asarray(exit_macs(model), dtype=np.float64)
    final = correct[-1].mean()
    print(f"exit accuracy on all {len(data)}: " + ", ".join(f"{a:.4f}" for a in correct.mean(1))
          + f"; full network {macs[-1] / 1e6:.1f} M MACs; policy {args.policy}, delta {args.delta:g}")

    half = len(data) // 2
    for target in (0.70, round(final - 0.01, 4)):
        start = time.perf_counter()
        rows: dict[str, list[tuple[float, float] | None]] = {}
        for split in range(args.splits):
            rng = np.random.default_rng(split)  # one stream: generators seeded alike draw related permutations
            order = rng.permutation(len(data))
            cal, test = order[:half], order[half:]
            chosen = thresholds_per_method(scores[:, cal], correct[:, cal], macs, target, args.delta,
                                           len(test), policy.max_score(model.num_classes), int(rng.integers(2**31)))
            for method, thr in chosen.items():
                r = None if thr is None else analysis.evaluate(scores[:, test], correct[:, test], thr, macs)
                rows.setdefault(method, []).append(None if r is None else (r.accuracy, r.mean_cost))
        print(f"\ntarget {target:.4f}: {args.splits} splits, {half} calibration / {len(data) - half} test images "
              f"({time.perf_counter() - start:.0f} s)")
        print(f"  {'method':31s} {'below target':>12s} {'unreachable':>11s} {'test acc':>9s} {'M MACs':>7s}")
        for method, results in rows.items():
            got = [r for r in results if r is not None]
            fails = sum(acc < target for acc, _ in got)
            acc = f"{np.mean([a for a, _ in got]):.4f}" if got else "-"
            mean_macs = f"{np.mean([m for _, m in got]) / 1e6:.2f}" if got else "-"
            print(f"  {method:31s} {fails / args.splits:12.0%} {len(results) - len(got):11d} {acc:>9s} {mean_macs:>7s}")
        both = [(g[1], e[1]) for g, e in zip(rows["guaranteed"], rows["empirical"]) if g and e]
        if both:
            g, e = np.mean(both, axis=0)
            print(f"  guaranteed / empirical mean MACs on the {len(both)} splits where both reach the target: "
                  f"{g / 1e6:.2f} / {e / 1e6:.2f} M = {g / e:.2f}x")
    print("\nbelow target: share of all splits where the method returned thresholds and the test half's accuracy"
          " fell below the target (an unreachable report promises nothing). The guaranteed method promises at"
          f" most {args.delta:.0%}; the assumption: calibration and test images are exchangeable.")


if __name__ == "__main__":
    main()
