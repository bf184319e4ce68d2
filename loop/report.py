"""Session reports rebuilt from the session file alone: a summary table, a figure and a text file.

Runs after a session, in the ``neurosteer run`` and ``neurosteer report`` commands. The summary has
one row per condition of the evaluation phase. A row gives n, the observed mean with its 95% CI
(Student t), the predicted mean, and the change from baseline in % and in baseline SDs. For dry runs
it adds the noise-free truth and its percentile in the candidate pool.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from scipy import stats

logger = logging.getLogger(__name__)

CONDITIONS = ("drive", "baseline", "suppress")


@dataclass(frozen=True)
class ConditionSummary:
    """Evaluation statistics of one condition."""

    condition: str
    n: int
    observed_mean: float
    ci_low: float
    ci_high: float
    predicted_mean: float
    change_percent: float
    change_sd: float
    truth_mean: float | None
    truth_percentile: float | None


def _text_column(dataset) -> list[str]:
    return [value.decode("utf-8") if isinstance(value, bytes) else str(value)
            for value in dataset[()]]


def read_trials(file: h5py.File) -> dict[str, np.ndarray]:
    """Return the trial table as columns; text columns decoded from UTF-8."""
    group = file["trials"]
    columns = {}
    for name, dataset in group.items():
        if h5py.check_string_dtype(dataset.dtype) is not None:
            columns[name] = np.array(_text_column(dataset), dtype=object)
        else:
            columns[name] = dataset[()]
    return columns


def summarise(path: Path) -> tuple[list[ConditionSummary], dict]:
    """Compute the evaluation summary of a session file; also return facts for the report."""
    with h5py.File(path, "r") as file:
        trials = read_trials(file)
        facts = {key: (value.decode() if isinstance(value, bytes) else value)
                 for key, value in file.attrs.items()}
        facts["refreshed"] = "fmri/refreshed/observed" in file
        if facts["refreshed"]:
            # fMRI: the final GLM estimates, from every volume, replace those made online.
            final = dict(zip(file["fmri/refreshed/trial"][()].tolist(),
                             file["fmri/refreshed/observed"][()].tolist(), strict=True))
            trials["observed"] = np.array([final.get(int(t), o) for t, o in
                                           zip(trials["trial"], trials["observed"], strict=True)])
        truth_by_trial, pool_truth = {}, None
        if "simulator/truth" in file:
            truth_by_trial = dict(zip(file["simulator/trial"][()].tolist(),
                                      file["simulator/truth"][()].tolist(), strict=True))
        if "simulator/pool_truth" in file:
            pool_truth = file["simulator/pool_truth"][()]
        facts["layer_selections"] = []
        if "model/layer_selection/cv_r" in file:
            group = file["model/layer_selection"]
            for row in range(group["cv_r"].shape[0]):
                facts["layer_selections"].append((
                    int(group["n_samples"][row]), int(group["chosen"][row]),
                    dict(zip(group["layers"][row].tolist(), group["cv_r"][row].tolist(),
                             strict=True))))
        for name in ("experiment", "rig", "experiment_effective"):
            key = f"config/{name}"
            facts[f"{name}_text"] = file[key][()].decode("utf-8") if key in file else ""
        facts["n_dropped_frames"] = (int(file["display/frames/n_dropped_frames"][()].sum())
                                     if "display/frames/n_dropped_frames" in file else 0)
        facts["n_late_onsets"] = int(np.sum(trials["late"])) if "late" in trials else 0
        if "response_delay_s" in trials and len(trials["response_delay_s"]):
            speed = float(facts.get("speed", 1.0))
            facts["response_delay_median_s"] = float(np.median(trials["response_delay_s"])) * speed
            facts["trials_ahead_median"] = float(np.median(trials["trials_ahead"]))
            facts["trials_ahead_max"] = int(np.max(trials["trials_ahead"]))
        facts["n_pauses"] = file["display/pauses"].shape[0] if "display/pauses" in file else 0
        facts["gaps"] = []
        if "gaps/start" in file:
            facts["gaps"] = list(zip(_text_column(file["gaps/stream"]), file["gaps/start"][()],
                                     file["gaps/end"][()], strict=True))
        facts["resumes"] = []
        if "resumes/n_trials" in file:
            facts["resumes"] = list(zip(_text_column(file["resumes/from_file"]),
                                        file["resumes/n_trials"][()].tolist(),
                                        _text_column(file["resumes/damage"]), strict=True))
        facts["faults"] = []
        if "faults/kind" in file:
            facts["faults"] = list(zip(_text_column(file["faults/kind"]),
                                       _text_column(file["faults/message"]), strict=True))
    facts["n_trials"] = len(trials.get("trial", []))

    evaluation = trials["phase"] == "evaluation" if facts["n_trials"] else np.array([], bool)
    # Trials whose response a stream gap hid are kept in the file but have no response.
    if "epoch_ok" in trials:
        facts["n_flagged"] = int(np.count_nonzero(~trials["epoch_ok"]))
        evaluation = evaluation & trials["epoch_ok"]
    observed = {c: trials["observed"][evaluation & (trials["condition"] == c)]
                for c in CONDITIONS}
    baseline = observed["baseline"]
    baseline_mean = float(np.mean(baseline)) if len(baseline) else float("nan")
    baseline_sd = float(np.std(baseline, ddof=1)) if len(baseline) > 1 else float("nan")
    summaries = []
    # Conditions a plugin registered follow the three built-in ones, in name order.
    extra = sorted(set(trials["condition"][evaluation].tolist()) - {*CONDITIONS, "fallback"}) \
        if facts["n_trials"] else []
    for condition in (*CONDITIONS, *extra):
        mask = evaluation & (trials["condition"] == condition)
        values = trials["observed"][mask]
        n = len(values)
        if n == 0:
            continue
        mean = float(np.mean(values))
        half = (float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / np.sqrt(n))
                if n > 1 else float("nan"))
        truth_mean = truth_percentile = None
        if truth_by_trial:
            truth = np.array([truth_by_trial.get(int(t), np.nan) for t in trials["trial"][mask]])
            truth_mean = float(np.nanmean(truth))
            if pool_truth is not None:
                truth_percentile = float(stats.percentileofscore(pool_truth, truth_mean))
        summaries.append(ConditionSummary(
            condition, n, mean, mean - half, mean + half,
            float(np.nanmean(trials["predicted"][mask])),
            100.0 * (mean - baseline_mean) / abs(baseline_mean) if baseline_mean else float("nan"),
            (mean - baseline_mean) / baseline_sd if baseline_sd else float("nan"),
            truth_mean, truth_percentile,
        ))
    facts["trials"] = trials
    facts["pool_truth"] = pool_truth
    facts["truth_by_trial"] = truth_by_trial
    return summaries, facts


def ordering_holds(summaries: list[ConditionSummary], strict: bool = True) -> bool:
    """Return whether drive > baseline > suppress, with non-overlapping 95% CIs when ``strict``."""
    by = {s.condition: s for s in summaries}
    if not all(c in by for c in CONDITIONS):
        return False
    if not strict:
        return by["drive"].observed_mean > by["baseline"].observed_mean > by["suppress"].observed_mean
    return (by["drive"].ci_low > by["baseline"].ci_high
            and by["baseline"].ci_low > by["suppress"].ci_high)


def format_table(summaries: list[ConditionSummary]) -> str:
    """Return the summary as a fixed-width text table."""
    header = (f"{'condition':<10} {'n':>4} {'observed':>9} {'95% CI':>17} {'predicted':>10} "
              f"{'vs baseline':>12} {'in SDs':>7} {'truth':>7} {'pool pct':>9}")
    lines = [header, "-" * len(header)]
    for s in summaries:
        truth = f"{s.truth_mean:7.2f}" if s.truth_mean is not None else f"{'-':>7}"
        percentile = (f"{s.truth_percentile:8.1f}%" if s.truth_percentile is not None
                      else f"{'-':>9}")
        lines.append(
            f"{s.condition:<10} {s.n:>4} {s.observed_mean:9.3f} "
            f"[{s.ci_low:7.3f}, {s.ci_high:7.3f}] {s.predicted_mean:10.3f} "
            f"{s.change_percent:+11.1f}% {s.change_sd:+7.2f} {truth} {percentile}"
        )
    return "\n".join(lines)


def plot(summaries: list[ConditionSummary], facts: dict, path: Path) -> None:
    """Write the session figure: evaluation by condition, the trial sequence, pool truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"drive": "tab:red", "baseline": "tab:gray", "suppress": "tab:blue",
               "calibration": "tab:olive", "random": "tab:olive"}
    trials = facts["trials"]
    # Conditions that plugins registered get the remaining colours of matplotlib's cycle.
    spare = iter(["tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:cyan"] * 4)
    for condition in dict.fromkeys(trials["condition"].tolist()):
        if condition not in colours:
            colours[condition] = next(spare)
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))

    ax = axes[0]
    for position, s in enumerate(summaries):
        ax.bar(position, s.observed_mean, color=colours[s.condition], alpha=0.7)
        ax.errorbar(position, s.observed_mean, yerr=[[s.observed_mean - s.ci_low],
                                                     [s.ci_high - s.observed_mean]],
                    color="black", capsize=6)
        ax.plot(position, s.predicted_mean, "kD", label="predicted" if position == 0 else None)
    ax.set_xticks(range(len(summaries)), [s.condition for s in summaries])
    ax.set_ylabel("observed response (a.u.)")
    ax.set_title("Evaluation: mean and 95% CI")
    ax.legend(loc="best")

    ax = axes[1]
    for condition, colour in colours.items():
        mask = trials["condition"] == condition
        if mask.any():
            ax.plot(trials["trial"][mask], trials["observed"][mask], ".", color=colour,
                    label=condition, alpha=0.7)
    for phase in ("closed_loop", "evaluation"):
        starts = trials["trial"][trials["phase"] == phase]
        if len(starts):
            ax.axvline(starts[0] - 0.5, color="black", lw=0.8, ls="--")
            ax.text(starts[0], ax.get_ylim()[1], f" {phase.replace('_', ' ')}", va="top",
                    fontsize=8)
    ax.set_xlabel("trial")
    ax.set_ylabel("observed response (a.u.)")
    ax.set_title("Every trial")
    ax.legend(loc="best", fontsize=8)

    ax = axes[2]
    pool_truth = facts["pool_truth"]
    if pool_truth is not None:
        ax.hist(pool_truth, bins=50, color="lightgray", label="pool")
        for s in summaries:
            if s.truth_mean is not None:
                ax.axvline(s.truth_mean, color=colours[s.condition], lw=2,
                           label=f"{s.condition} mean (percentile {s.truth_percentile:.0f})")
        ax.set_xlabel("noise-free truth (z over the pool)")
        ax.set_title("Evaluation sentences in the pool")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no simulator truth (live session)", ha="center")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(session_file: Path) -> tuple[str, Path, Path]:
    """Rebuild the figure (``.png``) and report (``_report.md``) beside the session.

    Returns the printed summary (the table and its verdict lines) and the two paths.
    """
    session_file = Path(session_file)
    summaries, facts = summarise(session_file)
    if facts.get("stimuli") == "images":
        return _write_vision_report(session_file, facts)
    table = format_table(summaries)
    figure_path = session_file.with_suffix(".png")
    report_path = session_file.with_name(session_file.stem + "_report.md")
    plot(summaries, facts, figure_path)
    by = {s.condition: s for s in summaries}
    lines = [f"# Session report: {session_file.name}", "",
             f"- status: {facts.get('status')}; trials: {facts['n_trials']}; "
             f"faults: {len(facts['faults'])}",
             f"- model: {facts.get('model_identity')}; chosen layer: {facts.get('chosen_layer')}",
             f"- seed: {facts.get('seed')}; speed factor: {facts.get('speed')}",
             f"- display: {facts.get('display', 'headless')}; onsets more than 20 ms late: "
             f"{facts['n_late_onsets']}; fallback stimuli: {facts.get('n_fallbacks', 0)}; "
             f"operator pauses: {facts['n_pauses']}"]
    if "refresh_rate_hz" in facts:
        lines.append(f"- refresh rate measured at {facts['refresh_rate_hz']:.1f} Hz; dropped frames "
                     f"(PsychoPy's count, meaningless without vertical sync, as under Xvfb): "
                     f"{facts['n_dropped_frames']}")
    ahead = []
    if "response_delay_median_s" in facts and facts["trials_ahead_max"] == 0:
        lines.append(f"- each response was recorded before the next stimulus was chosen (a median "
                     f"of {facts['response_delay_median_s']:.1f} s after its onset, in the "
                     "experiment's time).")
    elif "response_delay_median_s" in facts:
        ahead.append(f"selection ran ahead of the data: a response was recorded a median of "
                     f"{facts['response_delay_median_s']:.1f} s after its onset (in the experiment's "
                     f"time, with the speed factor undone), when a median of "
                     f"{facts['trials_ahead_median']:g} more trials (at most "
                     f"{facts['trials_ahead_max']}) had been chosen and shown.")
        lines.append(f"- {ahead[0]}")
    if "display_lag_median_s" in facts:
        source = ("the simulated subject's photodiode channel, which lights a fixed time after "
                  "each onset marker, so this checks the measurement, not a display"
                  if facts.get("kind") == "dry_run" else "photodiode")
        lines.append(f"- display lag ({source}; median over {facts['display_lag_n_trials']} "
                     f"trials): {facts['display_lag_median_s'] * 1000:.1f} ms")
    for n_samples, chosen, cv_r in facts["layer_selections"]:
        scores = ", ".join(f"layer {k}: {v:.3f}" for k, v in cv_r.items())
        lines.append(f"- leave-one-out r by layer after {n_samples} trials: {scores}; "
                     f"chose layer {chosen}")
    if "closed_loop_stopped_after_block" in facts:
        lines.append(f"- the stop rule {_stop_rule(facts)!r} ended the closed loop after block "
                     f"{facts['closed_loop_stopped_after_block']}")
    for from_file, n_trials, damage in facts["resumes"]:
        lines.append(f"- resumed from {Path(from_file).name} after {n_trials} trials, replayed "
                     f"from that file; damage found in it: {damage}")
    for stream, start, end in facts["gaps"]:
        lines.append(f"- gap in stream {stream!r}: no samples from {start:.3f} to {end:.3f} "
                     f"({end - start:.2f} s)")
    if facts.get("n_flagged"):
        lines.append(f"- trials without a response (their windows overlapped a gap), left out of "
                     f"the model and the evaluation: {facts['n_flagged']}")
    for kind, message in facts["faults"]:
        lines.append(f"- fault ({kind}): {message}")
    verdict = [f"drive > baseline > suppress in the means: "
               f"{'yes' if ordering_holds(summaries, strict=False) else 'no'}; with "
               f"non-overlapping 95% CIs: {'yes' if ordering_holds(summaries) else 'no'}"]
    if "drive" in by and "suppress" in by and by["drive"].truth_percentile is not None:
        verdict.append(f"noise-free truth of the evaluation sentences: drive at percentile "
                       f"{by['drive'].truth_percentile:.1f} of the pool, suppress at percentile "
                       f"{by['suppress'].truth_percentile:.1f}.")
    if facts["refreshed"]:
        verdict.append("observed: each trial's GLM estimate from every volume of the run; the "
                       "trial table keeps the estimates the controller used online.")
    lines += ["", "## Evaluation", "", "```", table, "```", "", *verdict, "",
              "Columns: n trials; observed mean response over the target channels with its 95% "
              "CI (Student t); mean predicted response; change of the observed mean from the "
              "baseline mean, in % of the baseline mean and in baseline SDs; for dry runs, the "
              "mean noise-free truth (z over the pool) and its percentile among the pool's "
              "sentences."]
    if facts["experiment_text"]:
        lines += ["", "## Experiment file", "", "```toml", facts["experiment_text"].strip(), "```"]
    if facts["rig_text"]:
        lines += ["", "## Rig file (with the simulator's settings, for dry runs)", "", "```toml",
                  facts["rig_text"].strip(), "```"]
    lines += ["", f"![session figure]({figure_path.name})", ""]
    report_path.write_text("\n".join(lines), encoding="utf-8")
    return "\n".join([table, "", *verdict, *ahead]), figure_path, report_path


def _write_vision_report(session_file: Path, facts: dict) -> tuple[str, Path, Path]:
    """Write a vision session's report and contact sheet; see ``loop/vision_report.py``."""
    from loop.vision_report import format_vision, summarise_vision, write_contact_sheet

    results, vision = summarise_vision(session_file)
    sheet = write_contact_sheet(results, vision, session_file.with_name(
        session_file.stem + "_contact_sheet.png"))
    report_path = session_file.with_name(session_file.stem + "_report.md")
    table, verdict = format_vision(results)
    lines = [f"# Session report: {session_file.name}", "",
             f"- status: {facts.get('status')}; trials: {facts['n_trials']}; "
             f"faults: {len(facts['faults'])}",
             f"- model: {facts.get('model_identity')}; layers tried: "
             f"{facts.get('vision_layers', '')}; chosen: {facts.get('chosen_layer')}",
             f"- seed: {facts.get('seed')}; speed factor: {facts.get('speed')}",
             f"- onsets more than 20 ms late: {facts['n_late_onsets']}; fallback stimuli: "
             f"{facts.get('n_fallbacks', 0)}"]
    for kind, message in facts["faults"]:
        lines.append(f"- fault ({kind}): {message}")
    lines += ["", "## Evaluation", "", "```", *table, "```", "", *verdict, "",
              "Columns: the mean response over the evaluation repeats of each site's stretch "
              "image and of the best natural image for that site, observed and as the simulated "
              "subject's noise-free amplitude (same units). Then the site's share of the "
              "population response to its one-hot image and the best share of any natural "
              "image, observed and noise-free.",
              "", f"![contact sheet]({sheet.name})", ""]
    if facts["experiment_text"]:
        lines += ["## Experiment file", "", "```toml", facts["experiment_text"].strip(), "```", ""]
    report_path.write_text("\n".join(lines), encoding="utf-8")
    return "\n".join([*table, "", *verdict]), sheet, report_path


def _stop_rule(facts: dict) -> str:
    """Return the stop rule named in the session's effective settings."""
    import json

    text = facts.get("experiment_effective_text", "")
    return json.loads(text)["closed_loop"]["stop_rule"] if text else "?"
