"""The online GLM against BOLD built from known amplitudes with the same HRF regressors."""

from __future__ import annotations

import numpy as np
import pytest

from acquisition.glm import OnlineGLM
from acquisition.hrf import event_regressors

TR_S = 2.0
DURATION_S = 2.0
BASELINE = 100.0
DRIFT_PER_S = 0.004


def rapid_onsets(rng: np.random.Generator, n_volumes: int) -> np.ndarray:
    """Onsets every 3 to 5 s from 6 s on, ending 40 s before the last volume."""
    last_onset_s = (n_volumes - 1) * TR_S - 40.0
    onsets = [6.0]
    while onsets[-1] + 5.0 < last_onset_s:
        onsets.append(onsets[-1] + rng.uniform(3.0, 5.0))
    return np.array(onsets)


def simulate_bold(onsets_s: np.ndarray, amplitudes: np.ndarray, times_s: np.ndarray,
                  noise_sd: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Return baseline + linear drift + the trials' responses (+ white noise): ``(n_volumes, n_rois)``."""
    responses = event_regressors(onsets_s, DURATION_S, times_s) @ amplitudes
    bold = BASELINE + DRIFT_PER_S * times_s[:, None] + responses
    if noise_sd:
        bold = bold + rng.normal(0.0, noise_sd, bold.shape)
    return bold


def fitted_glm(onsets_s: np.ndarray, times_s: np.ndarray, bold: np.ndarray,
               volume_order: np.ndarray | None = None, trials_first: bool = True, **options) -> OnlineGLM:
    """Return a GLM given every trial and every volume in ``volume_order`` (default: in time order)."""
    glm = OnlineGLM(bold.shape[1], **options)
    if trials_first:
        add_trials(glm, onsets_s)
    for tr_index in volume_order if volume_order is not None else range(len(times_s)):
        glm.add_volume(int(tr_index), times_s[tr_index], bold[tr_index])
    if not trials_first:
        add_trials(glm, onsets_s)
    return glm


def add_trials(glm: OnlineGLM, onsets_s: np.ndarray) -> None:
    for trial, onset_s in enumerate(onsets_s):
        glm.add_trial(trial, onset_s, DURATION_S)


def session(seed: int, n_volumes: int = 600, n_rois: int = 2, amplitude_sd: float = 0.5,
            noise_sd: float = 0.0):
    rng = np.random.default_rng(seed)
    times_s = np.arange(n_volumes) * TR_S
    onsets_s = rapid_onsets(rng, n_volumes)
    amplitudes = rng.normal(1.0, amplitude_sd, (len(onsets_s), n_rois))
    bold = simulate_bold(onsets_s, amplitudes, times_s, noise_sd, rng)
    return onsets_s, times_s, amplitudes, bold


def drift_terms(times_s: np.ndarray, cutoff_s: float = 128.0) -> np.ndarray:
    """Intercept, linear trend and discrete cosines, written out independently of the GLM."""
    position = (times_s - times_s[0]) / (times_s[-1] - times_s[0])
    n_cosines = int(2 * (times_s[-1] - times_s[0]) / cutoff_s)
    cosines = [np.cos(np.pi * k * position) for k in range(1, n_cosines + 1)]
    return np.column_stack([np.ones_like(times_s), position, *cosines])


def correlation(estimates: np.ndarray, truth: np.ndarray) -> float:
    """Mean over ROIs of the correlation between estimated and true amplitudes."""
    per_roi = [np.corrcoef(estimates[:, roi], truth[:, roi])[0, 1] for roi in range(truth.shape[1])]
    return float(np.mean(per_roi))


def least_squares_all(design: np.ndarray, drift: np.ndarray, bold: np.ndarray) -> np.ndarray:
    full = np.hstack([design, drift])
    return np.linalg.lstsq(full, bold, rcond=None)[0][:design.shape[1]]


def least_squares_separate(design: np.ndarray, drift: np.ndarray, bold: np.ndarray) -> np.ndarray:
    """LSS: for each trial, one regressor for the trial and one for the sum of all other trials."""
    others_sum = design.sum(axis=1)
    estimates = np.empty((design.shape[1], bold.shape[1]))
    for trial in range(design.shape[1]):
        full = np.column_stack([design[:, trial], others_sum - design[:, trial], drift])
        estimates[trial] = np.linalg.lstsq(full, bold, rcond=None)[0][0]
    return estimates


def test_noise_free_amplitudes_recovered():
    onsets_s, times_s, amplitudes, bold = session(seed=1)
    glm = fitted_glm(onsets_s, times_s, bold, ridge=1e-9)

    estimates = glm.estimate(range(len(onsets_s)))

    assert estimates.shape == amplitudes.shape
    np.testing.assert_allclose(estimates, amplitudes, atol=1e-6)


def test_equal_amplitudes_unshrunk_by_default_ridge():
    # The penalty acts on deviations from the mean amplitude, so equal amplitudes cost nothing.
    rng = np.random.default_rng(2)
    times_s = np.arange(300) * TR_S
    onsets_s = rapid_onsets(rng, 300)
    amplitudes = np.tile([1.5, -0.7], (len(onsets_s), 1))
    glm = fitted_glm(onsets_s, times_s, simulate_bold(onsets_s, amplitudes, times_s))

    np.testing.assert_allclose(glm.estimate(range(len(onsets_s))), amplitudes, atol=1e-8)


def test_default_ridge_matches_dense_solution():
    onsets_s, times_s, _, bold = session(seed=3, n_volumes=300, noise_sd=0.5)
    glm = fitted_glm(onsets_s, times_s, bold)
    n_trials = len(onsets_s)

    # Minimise |y - X a - D c|**2 + ridge |C a|**2 with C = I - 1 1'/n, as one stacked least-squares problem.
    centring = np.eye(n_trials) - 1.0 / n_trials
    stacked_design = np.block([
        [event_regressors(onsets_s, DURATION_S, times_s), drift_terms(times_s)],
        [np.sqrt(glm.ridge) * centring, np.zeros((n_trials, drift_terms(times_s).shape[1]))],
    ])
    stacked_bold = np.vstack([bold, np.zeros((n_trials, bold.shape[1]))])
    expected = np.linalg.lstsq(stacked_design, stacked_bold, rcond=None)[0][:n_trials]

    np.testing.assert_allclose(glm.estimate(range(n_trials)), expected, atol=1e-8)


def test_noisy_estimates_correlate_with_truth():
    # Amplitude SD 0.5 and noise SD 0.5 per volume. A 2 s trial's response peaks near 0.4 times its
    # amplitude, so one trial's peak is below the noise. The GLM reached r = 0.48 here. Unrelated
    # amplitudes give a mean r over 4 ROIs of about 290 trials with an SD near 0.03, so 0.3 is far
    # above chance and far below what the estimator reaches.
    onsets_s, times_s, amplitudes, bold = session(seed=4, n_rois=4, noise_sd=0.5)
    glm = fitted_glm(onsets_s, times_s, bold)

    assert correlation(glm.estimate(range(len(onsets_s))), amplitudes) > 0.3


def test_estimator_beats_least_squares():
    onsets_s, times_s, amplitudes, bold = session(seed=5, n_rois=4, noise_sd=0.5)
    design = event_regressors(onsets_s, DURATION_S, times_s)
    drift = drift_terms(times_s)

    r_glm = correlation(fitted_glm(onsets_s, times_s, bold).estimate(range(len(onsets_s))), amplitudes)
    r_least_squares = correlation(least_squares_all(design, drift, bold), amplitudes)
    r_separate = correlation(least_squares_separate(design, drift, bold), amplitudes)

    # Overlapping regressors inflate the variance of plain least squares. The module docstring quotes
    # these r.
    assert r_glm > r_least_squares + 0.15
    assert r_glm > r_separate - 0.03


def test_all_nan_volumes_same_as_omitted():
    onsets_s, times_s, _, bold = session(seed=6, n_volumes=300, noise_sd=0.5)
    dropped = np.array([40, 41, 150, 233])
    with_nan = bold.copy()
    with_nan[dropped] = np.nan
    kept_volumes = np.setdiff1d(np.arange(len(times_s)), dropped)

    glm_nan = fitted_glm(onsets_s, times_s, with_nan)
    glm_omitted = fitted_glm(onsets_s, times_s, bold, volume_order=kept_volumes)

    assert glm_nan.n_volumes == len(kept_volumes)
    trials = range(len(onsets_s))
    np.testing.assert_allclose(glm_nan.estimate(trials), glm_omitted.estimate(trials), rtol=1e-9, atol=1e-12)


def test_all_nan_volume_can_be_resent():
    onsets_s, times_s, _, bold = session(seed=7, n_volumes=200)
    glm = OnlineGLM(2)
    glm.add_trial(0, onsets_s[0], DURATION_S)
    glm.add_volume(5, times_s[5], np.full(2, np.nan))
    glm.add_volume(5, times_s[5], bold[5])

    assert glm.n_volumes == 1


def test_partly_missing_roi_fitted_on_its_own_volumes():
    onsets_s, times_s, _, bold = session(seed=8, n_volumes=300, n_rois=3, noise_sd=0.5)
    # Inside the run, so that the span and with it the drift terms stay the same for every ROI.
    missing = np.array([30, 31, 32, 170])
    with_nan = bold.copy()
    with_nan[missing, 1] = np.nan
    trials = range(len(onsets_s))

    estimates = fitted_glm(onsets_s, times_s, with_nan).estimate(trials)
    complete_rois = fitted_glm(onsets_s, times_s, bold[:, [0, 2]]).estimate(trials)
    kept_volumes = np.setdiff1d(np.arange(len(times_s)), missing)
    partial_roi = fitted_glm(onsets_s, times_s, bold[:, [1]], volume_order=kept_volumes).estimate(trials)

    np.testing.assert_allclose(estimates[:, [0, 2]], complete_rois, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(estimates[:, [1]], partial_roi, rtol=1e-9, atol=1e-12)


def test_out_of_order_volumes_same_estimates():
    onsets_s, times_s, _, bold = session(seed=9, n_volumes=300, noise_sd=0.5)
    shuffled = np.random.default_rng(10).permutation(len(times_s))
    trials = range(len(onsets_s))

    in_order = fitted_glm(onsets_s, times_s, bold).estimate(trials)
    out_of_order = fitted_glm(onsets_s, times_s, bold, volume_order=shuffled).estimate(trials)

    np.testing.assert_allclose(out_of_order, in_order, rtol=1e-9, atol=1e-12)


def test_trials_after_volumes_same_estimates():
    onsets_s, times_s, _, bold = session(seed=14, n_volumes=300, n_rois=3, noise_sd=0.5)
    bold[[50, 120], 2] = np.nan
    trials = range(len(onsets_s))

    trials_first = fitted_glm(onsets_s, times_s, bold).estimate(trials)
    trials_last = fitted_glm(onsets_s, times_s, bold, trials_first=False).estimate(trials)

    np.testing.assert_allclose(trials_last, trials_first, rtol=1e-9, atol=1e-12)


def test_interleaved_trials_same_estimates():
    # In a session each trial is added between volumes, up to 6 s after its onset, so its regressor
    # starts from the volumes already received. Volumes also arrive up to 3 TRs late.
    onsets_s, times_s, _, bold = session(seed=11, n_volumes=300, noise_sd=0.5)
    rng = np.random.default_rng(12)
    lateness = rng.integers(0, 4, len(times_s))
    marker_delays_s = rng.uniform(0.0, 6.0, len(onsets_s))
    arrival_order = np.argsort(np.arange(len(times_s)) + lateness, kind="stable")
    glm = OnlineGLM(2)
    next_trial = 0
    for tr_index in arrival_order:
        arrival_s = times_s[tr_index] + lateness[tr_index] * TR_S
        while next_trial < len(onsets_s) and onsets_s[next_trial] + marker_delays_s[next_trial] <= arrival_s:
            glm.add_trial(next_trial, onsets_s[next_trial], DURATION_S)
            next_trial += 1
        glm.add_volume(int(tr_index), times_s[tr_index], bold[tr_index])
        glm.estimate(range(next_trial))  # refit every TR, as the controller does
    trials = range(len(onsets_s))

    expected = fitted_glm(onsets_s, times_s, bold).estimate(trials)

    assert glm.n_trials == len(onsets_s)
    np.testing.assert_allclose(glm.estimate(trials), expected, rtol=1e-9, atol=1e-12)


def test_ready_trials_after_estimable_volume():
    glm = OnlineGLM(1, estimable_after_s=12.0)
    for trial, onset_s in zip([7, 3, 9], [10.0, 14.0, 30.0], strict=True):
        glm.add_trial(trial, onset_s, DURATION_S)
    ready_after = {}
    for tr_index, time_s in enumerate(np.arange(0.0, 30.0, TR_S)):
        glm.add_volume(tr_index, time_s, np.array([1.0]))
        ready_after[time_s] = glm.ready_trials()

    assert ready_after[20.0] == []
    assert ready_after[22.0] == [7]
    assert ready_after[24.0] == []
    assert ready_after[26.0] == [3]
    assert ready_after[28.0] == []
    assert glm.ready_trials() == []


def test_ready_trials_late_volume_and_nan():
    glm = OnlineGLM(2, estimable_after_s=12.0)
    glm.add_trial(0, 10.0, DURATION_S)
    glm.add_trial(1, 14.0, DURATION_S)
    glm.add_volume(20, 40.0, np.full(2, np.nan))

    assert glm.ready_trials() == []

    glm.add_volume(13, 26.0, np.array([1.0, np.nan]))

    assert glm.ready_trials() == [0, 1]

    glm.add_volume(2, 4.0, np.array([1.0, 2.0]))
    glm.add_trial(2, 20.0, DURATION_S)

    assert glm.ready_trials() == []


def test_estimate_without_volumes_is_nan():
    glm = OnlineGLM(3)
    glm.add_trial(0, 5.0, DURATION_S)

    assert glm.estimate([]).shape == (0, 3)
    assert np.isnan(glm.estimate([0])).all()


@pytest.mark.parametrize(("call", "message"), [
    (lambda glm: glm.add_volume(0, 0.0, np.zeros(3)), r"shape \(2,\)"),
    (lambda glm: glm.add_volume(0, 0.0, np.zeros((1, 2))), r"shape \(2,\)"),
    (lambda glm: glm.add_volume(1, 2.0, np.zeros(2)), "TR 1 was already added"),
    (lambda glm: glm.add_volume(-1, 2.0, np.zeros(2)), "non-negative integer"),
    (lambda glm: glm.add_volume(5, 10.0, np.array([np.inf, 0.0])), "infinity"),
    (lambda glm: glm.add_trial(2, 3.0, DURATION_S), "before the onset 4.0 s of trial 1"),
    (lambda glm: glm.add_trial(0, 30.0, DURATION_S), "Trial 0 was already added"),
    (lambda glm: glm.add_trial(2, 30.0, 0.0), "duration_s of trial 2 must be a positive"),
    (lambda glm: glm.add_trial(2, float("nan"), DURATION_S), "onset_s of trial 2 must be finite"),
    (lambda glm: glm.estimate([0, 5]), r"Unknown trial ids \[5\]"),
])
def test_bad_arguments_raise(call, message):
    glm = OnlineGLM(2)
    glm.add_trial(0, 0.0, DURATION_S)
    glm.add_trial(1, 4.0, DURATION_S)
    glm.add_volume(1, 2.0, np.zeros(2))

    with pytest.raises(ValueError, match=message):
        call(glm)


@pytest.mark.parametrize(("options", "message"), [
    ({"n_rois": 0}, "n_rois must be a positive integer"),
    ({"n_rois": 1, "ridge": 0.0}, "ridge must be a positive number"),
    ({"n_rois": 1, "drift_cutoff_s": -1.0}, "drift_cutoff_s must be a positive"),
    ({"n_rois": 1, "estimable_after_s": float("nan")}, "estimable_after_s must be a non-negative"),
])
def test_bad_settings_raise(options, message):
    with pytest.raises(ValueError, match=message):
        OnlineGLM(**options)
