"""Control efficacy: random selection, open-loop search and closed loop on the same trial budget.

Runs the controller in-process (no LSL, stepped clock) against the simulated subject of the rig,
over several seeds. All policies run the same schedule (calibration, closed-loop blocks,
evaluation) with the same number of trials:

- random: drive and suppress sentences drawn at random;
- open_loop: every choice made by the calibration model, never updated (the method of
  Tuckute et al. 2024);
- closed_loop: the model updated after every trial and refitted after every block.

A fourth line, calibration_only, spends the closed-loop trials on more diverse calibration before
the evaluation: a stronger open-loop reference, reported for comparison.

For each policy it prints the mean noise-free truth of the selected sentences as a fraction of
the pool oracle. It does so twice: for the evaluation drive (suppress) sentences against the n best
(worst) pool sentences, and for every drive (suppress) sentence shown after calibration against
as many.

    python benchmarks/control_efficacy.py [--seeds 5] [--experiment FILE] [--rig FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from acquisition.ground_truth import GroundTruth  # noqa: E402
from loop.config import load_experiment, load_rig  # noqa: E402
from loop.offline import run_offline  # noqa: E402
from loop.session import load_pool_and_features  # noqa: E402

POLICIES = ("random", "open_loop", "closed_loop", "calibration_only")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=str(REPO / "experiments" /
                                                    "language_drive_suppress.toml"))
    parser.add_argument("--rig", default=str(REPO / "hardware_configs" / "simulated_ecog.toml"))
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()

    experiment_path = Path(args.experiment)
    experiment, rig = load_experiment(experiment_path), load_rig(args.rig)
    simulator = rig.simulator
    pool, features, identity = load_pool_and_features(experiment, experiment_path)
    truth = GroundTruth(pool.texts, simulator.readout_weight, simulator.surprisal_weight,
                        simulator.seed, simulator.surprisal_model)
    pool_truth = truth.reference_truth(pool.texts)
    loop = experiment.closed_loop
    budget = (experiment.calibration.n_trials + loop.n_blocks * (loop.n_drive + loop.n_suppress
                                                                + loop.n_baseline))
    print(f"pool: {len(pool)} sentences; model {identity}; trial budget before evaluation: "
          f"{budget}; evaluation: {experiment.evaluation.n_per_condition} per condition; "
          f"seeds: {args.seeds}")

    results = {policy: [] for policy in POLICIES}
    for seed in range(args.seeds):
        for policy in POLICIES:
            started = time.perf_counter()
            result = run_offline(experiment, simulator, pool, features, pool_truth, policy, seed)
            results[policy].append(result)
            print(f"  seed {seed} {policy:<16} evaluation: drive {result.drive_fraction:5.3f} "
                  f"suppress {result.suppress_fraction:5.3f}; after calibration: drive "
                  f"{result.controlled_drive_fraction:5.3f} suppress "
                  f"{result.controlled_suppress_fraction:5.3f}; layer {result.state.layer} "
                  f"({time.perf_counter() - started:.1f} s)")

    print(f"\nFraction of the pool oracle, mean ± SD over {args.seeds} seeds")
    print(f"{'policy':<17} {'evaluation drive':>17} {'evaluation suppress':>20} "
          f"{'shown drive':>14} {'shown suppress':>15}")
    means = {}
    for policy, rows in results.items():
        columns = [np.array([getattr(r, name) for r in rows]) for name in
                   ("drive_fraction", "suppress_fraction", "controlled_drive_fraction",
                    "controlled_suppress_fraction")]
        means[policy] = float(np.mean((columns[0] + columns[1]) / 2))
        cells = "".join(f"  {c.mean():6.3f} ± {c.std(ddof=1):5.3f}   " for c in columns)
        print(f"{policy:<17}{cells}")
    ratio = means["closed_loop"] / means["open_loop"]
    print(f"\nEvaluation, drive and suppress averaged: closed loop {means['closed_loop']:.3f}, "
          f"open-loop search {means['open_loop']:.3f}, ratio {ratio:.3f} "
          f"({'closed loop better' if ratio > 1 else 'closed loop NOT better'}); "
          f"calibration only {means['calibration_only']:.3f}, random {means['random']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
