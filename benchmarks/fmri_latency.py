"""Latency of one fMRI step: from a TR's values arriving to the updated model and the next choice.

A sender thread publishes one message per TR over real ZeroMQ on 127.0.0.1 (a whole session of
``--n-volumes`` TRs, paced faster than real time), with a trial every two TRs. The receiver runs
the session's chain per TR. It polls the subscriber, fills the TR table and updates the online GLM.
Then it updates the encoding model with the trials that became estimable, predicts the pool and
makes the UCB choice of the next drive stimulus. The baseline measured in the same run refits the ridge
model from scratch on every trial so far (penalty by leave-one-out) at each TR instead.

    python benchmarks/fmri_latency.py [--n-volumes 600] [--pool 3000] [--dims 640]
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from acquisition.fmri import FMRIResponses  # noqa: E402
from acquisition.glm import OnlineGLM  # noqa: E402
from acquisition.hrf import event_regressors  # noqa: E402
from acquisition.zmq_bridge import TRPublisher, TRSubscriber  # noqa: E402
from loop.selection import select_top  # noqa: E402
from synth.encoding import PoolScorer, RidgeEncoder, Standardizer, alpha_grid, ridge_loo  # noqa: E402
from synth.objectives import objective_for  # noqa: E402

TR_S = 2.0
SOA_TRS = 2
# Wall-clock seconds between two TRs of the sender; the session's TR is scaled to it.
PACE_S = 0.05


class PerfClock:
    def now(self) -> float:
        return time.perf_counter()

    def sleep_until(self, deadline: float) -> None:
        time.sleep(max(0.0, deadline - time.perf_counter()))


def bold(n_volumes: int, truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return the ROI values of every volume: responses to one trial every SOA_TRS TRs, plus noise."""
    onsets = np.arange(len(truth)) * SOA_TRS * TR_S
    times = (np.arange(n_volumes) + 0.5) * TR_S
    signal = event_regressors(onsets, np.full(len(truth), 2.0), times) @ (1.0 + 0.5 * truth)
    return 100.0 + signal[:, None] + rng.normal(0, 0.4, (n_volumes, 1))


def run(n_volumes: int, n_pool: int, n_dims: int, refit: bool) -> tuple[np.ndarray, int]:
    """Stream one session and return two results.

    They are the latency of each TR that updated the model, in seconds, and the number of TRs
    that the receiver took more than one TR late.
    """
    rng = np.random.default_rng(0)
    features = rng.normal(size=(n_pool, n_dims)).astype(np.float32)
    n_trials = n_volumes // SOA_TRS - 8
    shown = rng.choice(n_pool, n_trials, replace=False)
    truth = features[shown] @ rng.normal(size=n_dims) / np.sqrt(n_dims)
    values = bold(n_volumes, truth, rng)

    clock = PerfClock()
    publisher = TRPublisher("tcp://127.0.0.1:0")
    subscriber = TRSubscriber(publisher.address, roi_names=["language"])
    publisher.wait_for_subscribers(1, 10.0)
    speed = TR_S / PACE_S
    start = clock.now() + 0.2
    responses = FMRIResponses(subscriber, OnlineGLM(1), clock, start, TR_S, speed,
                              stall_timeout_trs=100.0)
    sent_at = np.full(n_volumes, np.nan)

    def send() -> None:
        for tr in range(n_volumes):
            clock.sleep_until(start + (tr + 1) * PACE_S)
            sent_at[tr] = clock.now()
            publisher.send(tr, sent_at[tr], [float(values[tr, 0])], ["language"])

    # Calibration: the first 40 trials fit the model before the stream starts.
    standard = Standardizer.fit(features)
    alphas = alpha_grid(0.1, 1e6, 29)
    encoder = RidgeEncoder(standard, ["target"])
    encoder.fit(features[shown[:40]], truth[:40, None], alphas)
    scorer = PoolScorer(encoder, features)
    observed = list(truth[:40])
    for trial in range(n_trials):
        responses.register(trial, start + trial * SOA_TRS * PACE_S, 2.0 / speed)

    sender = threading.Thread(target=send)
    sender.start()
    latencies = []
    available = np.ones(n_pool, dtype=bool)
    while sender.is_alive():
        ready = responses.poll(0.01)
        if not ready:
            continue
        for trial in sorted(ready):
            if trial < 40:
                continue
            if refit:
                observed.append(float(ready[trial][0]))
                targets = np.array(observed)[:, None]
                design = standard.transform(features[shown[:len(observed)]])[:, :-1]
                ridge_loo(design, targets, alphas)
                encoder.fit(features[shown[:len(observed)]], targets, alphas)
                scorer.refresh()
            else:
                scorer.apply_update(encoder.update(features[shown[trial]][None],
                                                   np.array([[ready[trial][0]]])))
        value, sd = objective_for("drive").evaluate(scorer.mean, scorer.sd)
        select_top(value, sd, available, 1.0, 1)
        done = clock.now()
        # The TR whose arrival made these trials estimable is the newest one received.
        newest = int(np.nanargmax(responses.table.arrival_times))
        latencies.append(done - sent_at[newest])
    sender.join()
    responses.close()
    subscriber.close()
    publisher.close()
    n_late = sum(status == "late" for status in responses.table.statuses[:n_volumes])
    return np.array(latencies), n_late


def glm_update_times(n_volumes: int = 600, n_trials: int = 250, n_timed: int = 50) -> np.ndarray:
    """Return the time of one GLM update (a volume added, ready trials estimated) at a run's end.

    The GLM has 4 ROIs and ``n_trials`` trials; the last ``n_timed`` of ``n_volumes`` TRs are timed.
    """
    rng = np.random.default_rng(13)
    times_s = np.arange(n_volumes) * TR_S
    onsets_s = np.linspace(6.0, times_s[-1] - 16.0, n_trials)
    signal = event_regressors(onsets_s, np.full(n_trials, 2.0), times_s) @ rng.normal(1.0, 0.5,
                                                                                   (n_trials, 4))
    values = 100.0 + signal + rng.normal(0, 0.5, signal.shape)
    glm = OnlineGLM(4)
    for trial, onset_s in enumerate(onsets_s):
        glm.add_trial(trial, onset_s, 2.0)
    for tr_index in range(n_volumes - n_timed):
        glm.add_volume(tr_index, times_s[tr_index], values[tr_index])
    glm.estimate(glm.ready_trials())

    durations_s = []
    for tr_index in range(n_volumes - n_timed, n_volumes):
        start_s = time.perf_counter()
        glm.add_volume(tr_index, times_s[tr_index], values[tr_index])
        glm.estimate(glm.ready_trials())
        durations_s.append(time.perf_counter() - start_s)
    return np.array(durations_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-volumes", type=int, default=600)
    parser.add_argument("--pool", type=int, default=3000)
    parser.add_argument("--dims", type=int, default=640)
    args = parser.parse_args()

    # Late TRs are counted below; their warnings would bury the figures.
    logging.getLogger("acquisition").setLevel(logging.ERROR)
    with threadpool_limits(limits=1, user_api="blas"):
        online, online_late = run(args.n_volumes, args.pool, args.dims, refit=False)
        baseline, baseline_late = run(args.n_volumes, args.pool, args.dims, refit=True)
    print(f"{args.n_volumes} TRs ({PACE_S * 1000:.0f} ms apart), pool {args.pool} x {args.dims}, "
          "one BLAS thread")
    for name, latency, n_late in (("online update (neurosteer)", online, online_late),
                                  ("full refit per TR", baseline, baseline_late)):
        print(f"  {name:<28} {len(latency):4d} updates: median {np.median(latency) * 1000:7.1f} ms, "
              f"p99 {np.percentile(latency, 99) * 1000:7.1f} ms; TRs taken late: {n_late}")
    print(f"  ratio of medians (refit / online): {np.median(baseline) / np.median(online):.1f}x")
    with threadpool_limits(limits=1, user_api="blas"):
        glm = glm_update_times()
    print(f"GLM update alone (600 volumes, 250 trials, 4 ROIs, last {len(glm)} TRs): median "
          f"{np.median(glm) * 1000:.1f} ms, p99 {np.percentile(glm, 99) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
