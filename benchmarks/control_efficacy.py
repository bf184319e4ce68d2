"""Control efficacy: random selection, open-loop search and closed loop on the same trial budget.

Runs the controller in-process (no LSL, stepped clock) against the simulated subject of the rig,
over several seeds, and prints for each policy the mean noise-free truth of the evaluation drive
and suppress sentences as a fraction of the pool oracle (the mean truth of the best n sentences).
Open-loop search spends the closed loop's trials on more calibration, as the anchor study did.

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

POLICIES = ("random", "open_loop", "closed_loop")


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
            print(f"  seed {seed} {policy:<12} drive {result.drive_fraction:5.3f} suppress "
                  f"{result.suppress_fraction:5.3f} layer {result.state.layer} "
                  f"({time.perf_counter() - started:.1f} s)")

    print(f"\n{'policy':<12} {'drive / oracle':>16} {'suppress / oracle':>19} {'mean':>7}")
    means = {}
    for policy, rows in results.items():
        drive = np.array([r.drive_fraction for r in rows])
        suppress = np.array([r.suppress_fraction for r in rows])
        means[policy] = float(np.mean((drive + suppress) / 2))
        print(f"{policy:<12} {drive.mean():7.3f} ± {drive.std(ddof=1):5.3f} "
              f"{suppress.mean():10.3f} ± {suppress.std(ddof=1):5.3f} {means[policy]:7.3f}")
    ratio = means["closed_loop"] / means["open_loop"]
    print(f"\nclosed loop / open-loop search: {ratio:.3f} "
          f"({'closed loop better' if ratio > 1 else 'closed loop NOT better'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
