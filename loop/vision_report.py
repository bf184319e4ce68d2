"""The report of a vision session: stretch and one-hot population control, and a contact sheet.

Runs on any machine with the session file; it only reads the file and writes the contact sheet
beside it. Every figure comes from the evaluation phase, where each final synthesised image and
every natural image were shown ``vision.evaluation_repeats`` times:

- **stretch**: for each target site, whether its stretch image drove it beyond the best natural
  image. "Observed" compares the mean recorded responses over the repeats. "Truth" (dry runs)
  compares the simulated subject's noise-free response amplitudes, in the same units, against the
  best of the whole natural set.
- **one-hot population**: for each target site, its share of the population response to its
  one-hot image, ``r_site / sum_j r_j`` with negative responses counted as 0, against the best
  share any natural image reached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from loop.report import read_trials


@dataclass(frozen=True)
class SiteResult:
    """One target site's evaluation: what its synthesised images did against the natural images."""

    site: str
    stretch_observed: float
    natural_best_observed: float
    stretch_truth: float
    natural_best_truth: float
    one_hot_share_observed: float
    natural_best_share_observed: float
    one_hot_share_truth: float
    natural_best_share_truth: float


def population_share(responses: np.ndarray, site: int) -> np.ndarray:
    """Return each row's share of the population response held by ``site`` (negatives as 0)."""
    positive = np.clip(np.atleast_2d(responses), 0.0, None)
    total = positive.sum(axis=1)
    return np.divide(positive[:, site], total, out=np.full(len(total), np.nan), where=total > 0)


def _amplitude_scale(file: h5py.File) -> tuple[float, float]:
    """Return the simulated subject's ``mean_level`` and ``signal_sd`` from the stored rig file."""
    import tomllib

    from loop.config import VisionSimulatorSettings

    rig = tomllib.loads(file["config/rig"][()].decode("utf-8")) if "config/rig" in file else {}
    settings = VisionSimulatorSettings(**rig.get("vision_simulator", {}))
    return settings.mean_level, settings.signal_sd


def _site_names(file: h5py.File) -> list[str]:
    effective = json.loads(file["config/experiment_effective"][()].decode("utf-8"))
    return list(effective["response"]["target_channels"])


def _channel_indices(file: h5py.File, sites: list[str]) -> list[int]:
    stream = next(iter(file["streams"].values()))
    names = json.loads(stream.attrs["channel_names"])
    return [names.index(site) for site in sites]


def _means_by_image(ids: np.ndarray, responses: np.ndarray) -> dict[str, np.ndarray]:
    return {stimulus_id: np.nanmean(responses[ids == stimulus_id], axis=0)
            for stimulus_id in dict.fromkeys(ids.tolist())}


def summarise_vision(path: Path) -> tuple[list[SiteResult], dict]:
    """Compute the stretch and one-hot results of every target site in a vision session file."""
    with h5py.File(path, "r") as file:
        trials = read_trials(file)
        sites = _site_names(file)
        channels = _channel_indices(file, sites)
        # The simulated subject's noise-free response amplitudes, in the units of the observed
        # responses (mean_level + signal_sd x truth), so that the two compare directly.
        truth_by_trial = {}
        if "simulator/amplitudes" in file:
            truth_by_trial = dict(zip(file["simulator/trial"][()].tolist(),
                                      file["simulator/amplitudes"][()], strict=True))
        mean_level, signal_sd = _amplitude_scale(file)
        images, id_of_label = {}, {}
        if "stimuli/image" in file:
            stimulus_ids = file["stimuli/stimulus_id"].asstr()[()]
            images = dict(zip(stimulus_ids, file["stimuli/image"][()], strict=True))
            id_of_label = dict(zip(file["stimuli/label"].asstr()[()], stimulus_ids, strict=True))
        # The simulated subject names natural images by their label in the image set.
        natural_truth_of = {}
        if "simulator/natural/truth" in file:
            natural_truth_of = {id_of_label.get(label, label): mean_level + signal_sd * row
                                for label, row in zip(file["simulator/natural/ids"].asstr()[()],
                                                      file["simulator/natural/truth"][()],
                                                      strict=True)}
    evaluation = (trials["phase"] == "evaluation") & trials["epoch_ok"]
    conditions = trials["condition"][evaluation]
    ids = trials["stimulus_id"][evaluation]
    observed = np.asarray(trials["observed_channels"][evaluation])[:, channels]
    observed_means = _means_by_image(ids, observed)
    truth = None
    if truth_by_trial:
        truth = np.array([truth_by_trial.get(int(t), np.full(len(sites), np.nan))
                          for t in trials["trial"][evaluation]], dtype=np.float64)
    truth_means = _means_by_image(ids, truth) if truth is not None else {}

    natural_ids = list(dict.fromkeys(ids[conditions == "natural"].tolist()))
    natural_observed = np.array([observed_means[i] for i in natural_ids])
    if not natural_truth_of and truth_means:
        natural_truth_of = {i: truth_means[i] for i in natural_ids}
    natural_truth = (np.array([natural_truth_of[i] for i in natural_ids])
                     if natural_truth_of and all(i in natural_truth_of for i in natural_ids)
                     else None)
    nan = float("nan")
    image_of = {condition: stimulus_id for condition, stimulus_id in zip(conditions, ids,
                                                                            strict=True)}
    results = []
    for position, site in enumerate(sites):
        stretch = image_of.get(f"stretch:{site}")
        one_hot = image_of.get(f"one_hot_population:{site}")
        if stretch is None and one_hot is None:
            continue

        def value(means, stimulus_id, site_position=position):
            return float(means[stimulus_id][site_position]) if stimulus_id and means else nan

        def share(means, stimulus_id, site_position=position):
            if not stimulus_id or not means:
                return nan
            return float(population_share(means[stimulus_id], site_position)[0])

        results.append(SiteResult(
            site=site,
            stretch_observed=value(observed_means, stretch),
            natural_best_observed=float(np.max(natural_observed[:, position])),
            stretch_truth=value(truth_means, stretch),
            natural_best_truth=(float(np.max(natural_truth[:, position]))
                                if natural_truth is not None else nan),
            one_hot_share_observed=share(observed_means, one_hot),
            natural_best_share_observed=float(np.nanmax(population_share(natural_observed,
                                                                         position))),
            one_hot_share_truth=share(truth_means, one_hot),
            natural_best_share_truth=(float(np.nanmax(population_share(natural_truth, position)))
                                      if natural_truth is not None else nan),
        ))
    facts = {"sites": sites, "images": images, "image_of": image_of,
             "natural_ids": natural_ids, "natural_observed": natural_observed,
             "natural_truth": natural_truth, "observed_means": observed_means,
             "truth_means": truth_means}
    return results, facts


def _fraction(flags: list[bool]) -> str:
    return f"{sum(flags)} of {len(flags)}" if flags else "none evaluated"


def format_vision(results: list[SiteResult]) -> tuple[list[str], list[str]]:
    """Return the per-site table's lines, and the verdict lines with the fractions of sites."""
    groups = (f"{'':<8} |{'stretch, observed':^22}|{'stretch, truth':^22}|"
              f"{'one-hot share, obs.':^22}|{'one-hot share, truth':^22}")
    header = (f"{'site':<8} |{'image':>10} {'best nat.':>10} |{'image':>10} {'best nat.':>10} "
              f"|{'image':>10} {'best nat.':>10} |{'image':>10} {'best nat.':>10}")
    lines = [groups, header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.site:<8} |{r.stretch_observed:>10.3f} {r.natural_best_observed:>10.3f} "
                     f"|{r.stretch_truth:>10.3f} {r.natural_best_truth:>10.3f} "
                     f"|{r.one_hot_share_observed:>10.3f} {r.natural_best_share_observed:>10.3f} "
                     f"|{r.one_hot_share_truth:>10.3f} {r.natural_best_share_truth:>10.3f}")

    stretch_observed = [r.stretch_observed > r.natural_best_observed for r in results
                        if np.isfinite(r.stretch_observed)]
    stretch_truth = [r.stretch_truth > r.natural_best_truth for r in results
                     if np.isfinite(r.stretch_truth) and np.isfinite(r.natural_best_truth)]
    share_observed = [r.one_hot_share_observed > r.natural_best_share_observed for r in results
                      if np.isfinite(r.one_hot_share_observed)]
    share_truth = [r.one_hot_share_truth > r.natural_best_share_truth for r in results
                   if np.isfinite(r.one_hot_share_truth)]

    verdict = [
        f"stretch: the synthesised image beat the best natural image at "
        f"{_fraction(stretch_observed)} sites observed, and {_fraction(stretch_truth)} in the "
        "noise-free truth.",
        f"one-hot population: the target site's share of the population response beat every "
        f"natural image's at {_fraction(share_observed)} sites observed, and "
        f"{_fraction(share_truth)} in the noise-free truth.",
    ]
    if results:
        verdict.append(
            f"median share of the population response: one-hot images "
            f"{np.nanmedian([r.one_hot_share_truth for r in results]):.3f} (truth), "
            f"{np.nanmedian([r.one_hot_share_observed for r in results]):.3f} (observed); the "
            f"best natural image per site {np.nanmedian([r.natural_best_share_truth for r in results]):.3f} "
            f"(truth), {np.nanmedian([r.natural_best_share_observed for r in results]):.3f} (observed).")
    return lines, verdict


def write_contact_sheet(results: list[SiteResult], facts: dict, path: Path) -> Path:
    """Draw one row per target site: its best natural image, its stretch and one-hot images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, image_of = facts["images"], facts["image_of"]
    columns = ["best natural", "stretch", "one-hot population"]
    evolved = [condition for condition in image_of if condition.startswith("evolved:")]
    if evolved:
        columns.append("evolved (no gradient)")
    figure, axes = plt.subplots(len(results), len(columns), squeeze=False,
                                figsize=(2.2 * len(columns), 2.3 * len(results)))
    natural_truth, natural_ids = facts["natural_truth"], facts["natural_ids"]
    for row, result in enumerate(results):
        position = facts["sites"].index(result.site)
        scores = natural_truth if natural_truth is not None else facts["natural_observed"]
        best_natural = natural_ids[int(np.argmax(scores[:, position]))] \
            if len(natural_ids) == len(scores) else natural_ids[0]
        cells = [(best_natural, f"response {result.natural_best_truth:.2f} (truth)"),
                 (image_of.get(f"stretch:{result.site}"),
                  f"response {result.stretch_truth:.2f} (truth)"),
                 (image_of.get(f"one_hot_population:{result.site}"),
                  f"site's share {result.one_hot_share_truth:.2f} (truth)")]
        if evolved:
            evolved_id = image_of.get(f"evolved:{result.site}")
            truth = facts["truth_means"].get(evolved_id) if evolved_id else None
            cells.append((evolved_id, f"response {truth[position]:.2f} (truth)"
                          if truth is not None else ""))
        for column, (stimulus_id, caption) in enumerate(cells):
            axis = axes[row, column]
            axis.axis("off")
            if stimulus_id is None or stimulus_id not in images:
                continue
            axis.imshow(images[stimulus_id])
            title = f"{result.site}: {columns[column]}" if column == 0 else columns[column]
            axis.set_title(f"{title}\n{caption}", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
