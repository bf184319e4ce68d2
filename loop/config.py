"""Experiment and rig files: TOML, validated by pydantic models before anything starts.

Runs in the process that starts a session (the ``neurosteer`` command). Every setting is typed and
frozen, unknown keys are rejected, and each problem is reported as one line naming the file, the key
and what is expected. Relative paths in a file are taken relative to that file.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loop.errors import ConfigError

BUILTIN_PREFIX = "builtin:"
PACKAGE_DATA = Path(__file__).resolve().parent.parent / "synth" / "data"

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


# Experiment file


class ExperimentInfo(Settings):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Name of the experiment; the session file is named after it (letters, digits, `_.-`)."""

    description: str = ""
    """Free text stored in the session file."""

    seed: int = 0
    """Seed of every random choice the controller makes (calibration set, order, jitter)."""

    plugins: list[str] = []
    """Python files (paths relative to the file listing them) that register conditions and rules."""


class ModelSettings(Settings):
    name: str = "embedded:gemma3-270m"
    """Language model: `embedded:gemma3-270m`, a local folder, or a hub name already cached."""

    layers: list[Annotated[int, Field(ge=1)]] = Field(default=[6, 9, 12, 15], min_length=1)
    """Candidate layers (blocks counted from 1); calibration keeps the best by cross-validation."""

    pooling: Literal["mean", "last"] = "mean"
    """Sentence vector: `mean` over the tokens (special tokens excluded) or the `last` token."""

    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    """Precision of the forward pass; `auto` is bfloat16."""

    device: str = "auto"
    """`auto` (the first CUDA GPU when there is one), `cpu` or `cuda:N`."""

    batch_size: Annotated[int, Field(ge=1)] = 64
    """Sentences per forward pass."""


class PoolSettings(Settings):
    file: str = "builtin:pool_gemma3_270m_6w.txt"
    """Candidate pool: `builtin:NAME` (shipped), or a .txt/.csv file relative to the experiment file."""

    column: str = "sentence"
    """Column of a CSV pool that contains the sentences."""

    n_words: Annotated[int, Field(ge=1)] | None = 6
    """Keep only sentences of exactly this many words; leave out to keep all."""


class EncodingSettings(Settings):
    alpha_min: PositiveFloat = 1e-1
    """Smallest ridge penalty of the log grid searched per target."""

    alpha_max: PositiveFloat = 1e6
    """Largest ridge penalty of the grid."""

    n_alphas: Annotated[int, Field(ge=2)] = 29
    """Number of penalties in the grid."""

    exploration: NonNegativeFloat = 1.0
    """Weight of the predictive SD when choosing drive and suppress stimuli (0: exploit only)."""

    @model_validator(mode="after")
    def _alpha_order(self) -> EncodingSettings:
        if self.alpha_max <= self.alpha_min:
            raise ValueError("alpha_max must be larger than alpha_min")
        return self


class ResponseSettings(Settings):
    target_channels: list[str] = Field(min_length=1)
    """Channel labels of the stream whose mean response is the target."""

    tmin_s: float = 0.1
    """Start of the response window after onset, in seconds."""

    tmax_s: float = 1.1
    """End of the response window after onset, in seconds."""

    baseline_s: tuple[float, float] = (-0.5, 0.0)
    """Baseline window [start, end] relative to onset, in seconds; subtracted from the response."""

    estimable_after_s: PositiveFloat = 12.0
    """fMRI: time after onset until a trial's response is estimated from the ROI time series, in seconds."""

    drift_cutoff_s: PositiveFloat = 128.0
    """fMRI: longest period of the cosine drift terms of the online GLM, in seconds."""

    glm_ridge: PositiveFloat = 1.0
    """fMRI: pull of per-trial estimates towards their mean: noise variance over amplitude variance."""

    @model_validator(mode="after")
    def _windows(self) -> ResponseSettings:
        if self.tmax_s <= self.tmin_s:
            raise ValueError("tmax_s must be larger than tmin_s")
        if self.baseline_s[1] <= self.baseline_s[0]:
            raise ValueError("baseline_s must be [start, end] with start < end")
        return self


class TimingSettings(Settings):
    stimulus_duration_s: PositiveFloat = 2.0
    """How long each sentence stays on screen, in seconds."""

    iti_s: NonNegativeFloat = 1.0
    """Mean interval from one sentence's offset to the next onset, in seconds."""

    iti_jitter_s: NonNegativeFloat = 0.2
    """Half-width of the uniform jitter added to each interval, in seconds."""

    max_late_onsets: Annotated[int, Field(ge=1)] = 10
    """Late onsets (over 20 ms after their due time) allowed before the session stops with an error."""

    max_fallbacks: Annotated[int, Field(ge=0)] = 5
    """Fallback stimuli (shown when a choice came too late) allowed before the session stops with an error."""


class PresentationSettings(Settings):
    mode: Literal["sentence", "rsvp"] = "sentence"
    """`sentence` shows the whole sentence at once; `rsvp` shows it word by word."""

    word_duration_s: PositiveFloat = 0.3
    """How long each word stays on screen in `rsvp` mode, in seconds."""

    font: str = "Noto Sans"
    """Font family. `Noto Sans` and the other fonts PsychoPy ships work on every OS."""

    font_file: str | None = None
    """Font file (.ttf or .otf) relative to this file; needed on Windows and macOS for other fonts."""

    text_height_deg: PositiveFloat = 1.0
    """Letter height, in degrees of visual angle."""

    wrap_width_deg: PositiveFloat = 30.0
    """Width at which text wraps, in degrees of visual angle."""

    text_color: str = "white"
    """Text colour (a PsychoPy colour name)."""

    max_lines: Annotated[int, Field(ge=1)] | None = 3
    """Lines a sentence may take; longer sentences are rejected before the run."""

    image_size_deg: PositiveFloat = 8.0
    """Length of an image's longer side, in degrees of visual angle."""

    fixation: str = "+"
    """Text shown between stimuli."""

    instructions: str = ""
    """Text shown before the first trial; empty for none."""

    instructions_duration_s: NonNegativeFloat = 0.0
    """How long the instructions stay on screen, in seconds."""

    rest: str = ""
    """Text shown between phases and closed-loop blocks, while the model is refitted."""

    rest_duration_s: NonNegativeFloat = 0.0
    """Shortest break between phases and blocks, in seconds."""

    @model_validator(mode="after")
    def _messages_have_durations(self) -> PresentationSettings:
        if self.instructions and self.instructions_duration_s == 0:
            raise ValueError("instructions need an instructions_duration_s above 0")
        return self


class CalibrationSettings(Settings):
    n_trials: Annotated[int, Field(ge=10)] = 150
    """Diverse pool sentences shown before the first model fit."""


class ClosedLoopSettings(Settings):
    n_blocks: Annotated[int, Field(ge=0)] = 4
    """Closed-loop blocks; the layer and the penalty are chosen again after each block."""

    n_drive: Annotated[int, Field(ge=0)] = 12
    """Drive trials per block."""

    n_suppress: Annotated[int, Field(ge=0)] = 12
    """Suppress trials per block."""

    n_baseline: Annotated[int, Field(ge=0)] = 12
    """Baseline trials (random pool sentences) per block."""

    extra_conditions: dict[str, Annotated[int, Field(ge=1)]] = {}
    """Registered conditions and their trials per block, e.g. `{ moderate = 6 }`; evaluated too."""

    selection: str = "ucb"
    """Registered selection rule: `ucb` (value + exploration x SD), `greedy`, or a plugin's."""

    order: str = "shuffled"
    """Registered trial order within a block: `shuffled`, `interleaved`, or a plugin's."""

    stop_rule: str = "never"
    """Registered rule that can end the closed loop after a block: `never`, or a plugin's."""


class EvaluationSettings(Settings):
    n_per_condition: Annotated[int, Field(ge=2)] = 50
    """Fresh sentences per condition (drive, suppress, baseline and each extra condition), at least 2."""


class SynthesisSettings(Settings):
    n_blocks: Annotated[int, Field(ge=0)] = 2
    """Closed-loop blocks of images synthesised by gradient ascent; the model is refitted after each."""

    objectives: list[Literal["stretch", "one_hot_population", "drive", "suppress"]] = Field(
        default=["stretch", "one_hot_population"], min_length=1)
    """Objectives synthesised for every target site in each block and in evaluation."""

    target_sites: list[str] | None = None
    """Channels to synthesise for; default all of `response.target_channels`."""

    n_steps: Annotated[int, Field(ge=1)] = 48
    """Gradient steps per synthesis."""

    learning_rate: PositiveFloat = 0.05
    """Adam step size on the image parameters."""

    parameterisation: Literal["fourier", "pixel"] = "fourier"
    """Image parameters: a decorrelated Fourier spectrum (transfers better) or plain pixels."""

    total_variation: NonNegativeFloat = 0.1
    """Weight of the total-variation penalty, in the objective's units."""

    max_rms_contrast: Annotated[float, Field(gt=0, le=0.5)] = 0.25
    """Largest RMS contrast (SD of pixel values in [0, 1]) of a synthesised image."""

    device: str = "auto"
    """Device for synthesis: `auto` (a CUDA GPU when there is one), `cpu` or `cuda:N`."""

    n_references: Annotated[int, Field(ge=0)] = 2
    """Natural images shown in every closed-loop block, so that drift shows in their responses."""


class EvolutionSettings(Settings):
    n_generations: Annotated[int, Field(ge=0)] = 2
    """Generations evolved against the observed responses (no gradient), one block each."""

    method: Literal["ga", "cmaes"] = "ga"
    """Genetic algorithm (as in XDream) or CMA-ES."""

    population_size: Annotated[int, Field(ge=4)] = 8
    """Images per generation."""

    target_site: str | None = None
    """Channel whose observed response is the score; default the first target site."""

    n_references: Annotated[int, Field(ge=0)] = 2
    """Natural reference images shown in every generation."""


class VisionSettings(Settings):
    model: str = "embedded:mobilenet_v2"
    """`embedded:mobilenet_v2` (shipped), `torchvision:NAME`, `timm:NAME` or a checkpoint file."""

    layers: list[str] = Field(default=["features.10", "features.13"], min_length=1)
    """Candidate layers (module names); the one with the best leave-one-out r is used."""

    pooling: Literal["grid", "mean"] = "grid"
    """Spatial pooling of a layer's map: a grid x grid average (keeps position) or the mean."""

    grid_size: Annotated[int, Field(ge=1)] = 3
    """Side of the pooling grid."""

    image_size: Annotated[int, Field(ge=32)] = 96
    """Side of the images shown and synthesised, in pixels."""

    device: str = "auto"
    """Device for feature extraction: `auto`, `cpu` or `cuda:N`."""

    natural_images: str = "builtin:natural"
    """Natural images: `builtin:natural` (photographs shipped in Python packages) or a folder."""

    calibration_repeats: Annotated[int, Field(ge=1)] = 2
    """Presentations of each natural image during calibration."""

    evaluation_repeats: Annotated[int, Field(ge=1)] = 3
    """Presentations of each natural and final synthesised image during evaluation."""

    synthesis: SynthesisSettings = SynthesisSettings()
    evolution: EvolutionSettings = EvolutionSettings()


class Experiment(Settings):
    experiment: ExperimentInfo
    model: ModelSettings = ModelSettings()
    pool: PoolSettings = PoolSettings()
    encoding: EncodingSettings = EncodingSettings()
    response: ResponseSettings
    timing: TimingSettings = TimingSettings()
    calibration: CalibrationSettings = CalibrationSettings()
    closed_loop: ClosedLoopSettings = ClosedLoopSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    presentation: PresentationSettings = PresentationSettings()
    vision: VisionSettings | None = None
    """Images instead of sentences; the `model` and `pool` tables are then unused."""

    allow_repeats: bool = False
    """Let the closed loop show a sentence again; evaluation sentences are always new."""

    # A description rather than a docstring: the reference page's table row cannot break lines.
    extends: str | None = Field(default=None, description=(
        "Base experiment file, relative to this file; this file then holds only the keys it "
        "changes. Tables merge key by key; values and lists replace the base's. A base may "
        "extend another. Put it above the first table."))

    @model_validator(mode="after")
    def _vision_sites_are_targets(self) -> Experiment:
        if self.vision is None:
            return self
        sites = set(self.response.target_channels)
        wanted = list(self.vision.synthesis.target_sites or [])
        if self.vision.evolution.target_site is not None:
            wanted.append(self.vision.evolution.target_site)
        unknown = [name for name in wanted if name not in sites]
        if unknown:
            raise ValueError(f"vision: sites {unknown} are not in response.target_channels, "
                             "which lists the sites the encoding model learns")
        return self

    @model_validator(mode="after")
    def _window_fits_trial(self) -> Experiment:
        soa = self.timing.stimulus_duration_s + self.timing.iti_s - self.timing.iti_jitter_s
        if self.response.tmax_s >= soa:
            raise ValueError(
                f"response.tmax_s ({self.response.tmax_s} s) must end before the next onset "
                f"(shortest onset interval {soa:g} s)"
            )
        presentation = self.presentation
        if presentation.mode == "rsvp" and self.pool.n_words is not None:
            needed = self.pool.n_words * presentation.word_duration_s
            if needed > self.timing.stimulus_duration_s:
                longest = self.timing.stimulus_duration_s / self.pool.n_words
                raise ValueError(
                    f"presentation.word_duration_s: in rsvp mode {self.pool.n_words} words of "
                    f"{presentation.word_duration_s:g} s need {needed:g} s, longer than "
                    f"timing.stimulus_duration_s ({self.timing.stimulus_duration_s:g} s). Set "
                    f"word_duration_s to at most {longest:.3g} s, or lengthen the stimulus"
                )
        return self


# Rig file


class LSLSettings(Settings):
    config: str = "builtin:loopback"
    """liblsl configuration: `builtin:loopback` (this machine), `default` (lab network), or a file."""

    data_stream: str = "neurosteer-sim-ecog"
    """Name of the LSL stream with the neural data."""

    marker_stream: str = "neurosteer-markers"
    """Name of the marker stream neurosteer creates for stimulus onsets."""

    resolve_timeout_s: PositiveFloat = 10.0
    """How long to wait for the data stream at start, in seconds."""

    stall_report_s: PositiveFloat = 1.0
    """A data stream silent this long, in seconds, is reported as stalled (a fault in the session file)."""

    reconnect_timeout_s: PositiveFloat = 60.0
    """Wait for a stalled stream to come back (same source id) before the session stops, in seconds."""


class PhotodiodeSettings(Settings):
    corner: Literal["top_left", "top_right", "bottom_left", "bottom_right"] = "bottom_left"
    """Screen corner of the patch, which is white while a stimulus is shown and black otherwise."""

    size_pix: Annotated[int, Field(gt=0)] = 60
    """Side of the square patch, in pixels."""

    channel: str | None = None
    """Channel of the data stream that records the photodiode; the display lag is measured from it."""


class DisplaySettings(Settings):
    monitor_name: str | None = None
    """A monitor saved in PsychoPy's Monitor Center; the keys below may be left out, or must agree with it."""

    size_pix: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]] | None = None
    """Screen resolution in pixels [width, height]; the window must open at exactly this size."""

    monitor_width_cm: PositiveFloat | None = None
    """Visible width of the screen, in cm."""

    monitor_height_cm: PositiveFloat | None = None
    """Visible height of the screen, in cm; when given, the pixels must come out square."""

    viewing_distance_cm: PositiveFloat | None = None
    """Distance from the eyes to the screen, in cm."""

    refresh_rate_hz: PositiveFloat | None = None
    """Expected refresh rate; the measured rate must be within 5% of it. Leave out to skip the check."""

    screen: Annotated[int, Field(ge=0)] = 0
    """Index of the screen the window opens on."""

    fullscreen: bool = False
    """Open the window full screen."""

    background_color: str = "black"
    """Background colour (a PsychoPy colour name)."""

    units: Literal["deg", "degFlat", "degFlatPos", "cm", "pix", "height", "norm"] = "deg"
    """Default units of the window; the experiment's stimulus sizes are in degrees whatever this is."""

    photodiode: PhotodiodeSettings | None = None
    """A patch for a photodiode in a screen corner; leave out for none."""

    pause_key: str = "p"
    """Key that pauses the run after the current trial, and resumes it."""

    end_key: str = "escape"
    """Key that ends the run; completed trials are kept."""

    @model_validator(mode="after")
    def _monitor_described(self) -> DisplaySettings:
        if self.monitor_name is None:
            missing = [name for name in ("size_pix", "monitor_width_cm", "viewing_distance_cm")
                       if getattr(self, name) is None]
            if missing:
                raise ValueError(
                    f"the monitor is not described: set {', '.join(missing)}, or monitor_name to a "
                    "monitor saved in PsychoPy's Monitor Center (visual angles depend on them)"
                )
        if self.size_pix and self.monitor_width_cm and self.monitor_height_cm:
            width_cm_per_pix = self.monitor_width_cm / self.size_pix[0]
            height_cm_per_pix = self.monitor_height_cm / self.size_pix[1]
            if abs(width_cm_per_pix / height_cm_per_pix - 1) > 0.05:
                raise ValueError(
                    f"size_pix {list(self.size_pix)} and the screen size {self.monitor_width_cm:g} x "
                    f"{self.monitor_height_cm:g} cm give pixels that are not square "
                    f"({width_cm_per_pix * 10:.3f} x {height_cm_per_pix * 10:.3f} mm); check both"
                )
        if self.pause_key == self.end_key:
            raise ValueError(f"pause_key and end_key are both {self.pause_key!r}")
        return self


class VisionSimulatorSettings(Settings):
    n_sites: Annotated[int, Field(ge=1)] = 8
    """Recording sites, streamed as channels SITE001 onwards."""

    sfreq: PositiveFloat = 1000.0
    """Sampling rate, in Hz."""

    snr: PositiveFloat = 1.0
    """Signal SD / noise SD of one site's single-trial response."""

    signal_sd: PositiveFloat = 1.0
    """SD of a site's noise-free responses to the natural images."""

    mean_level: float = 2.0
    """Mean response to the natural images, in the same units."""

    latency_s: NonNegativeFloat = 0.05
    """Delay of the response after the onset, in seconds."""

    response_duration_s: PositiveFloat = 0.3
    """Duration of one response, in seconds."""

    baseline_s: PositiveFloat = 0.2
    """Pre-stimulus window the SNR is defined against, in seconds."""

    truth_model: str = "embedded:mobilenet_v2"
    """Network of the sites' truth: `embedded:mobilenet_v2`, `torchvision:NAME` or `timm:NAME`."""

    truth_layer: str = "features.10"
    """MobileNetV2 layer whose map the sites read through receptive fields (not the controller's)."""

    n_channels_per_site: Annotated[int, Field(ge=1)] = 6
    """Feature channels each site weighs."""

    exponent: Annotated[float, Field(ge=1.0)] = 1.5
    """Exponent of the rectifying output nonlinearity."""

    photodiode_lag_s: NonNegativeFloat | None = None
    """Display lag of a simulated photodiode channel (PHOTO), in seconds; none when unset."""

    seed: int = 7
    """Seed of the sites' receptive fields, weights and noise."""


class SimulatorSettings(Settings):
    n_channels: Annotated[int, Field(ge=1)] = 64
    """Channels of the simulated amplifier."""

    sfreq: PositiveFloat = 1000.0
    """Sampling rate, in Hz."""

    target_channels: list[Annotated[int, Field(ge=0)]] = Field(
        default=[8, 9, 10, 11, 16, 17, 18, 19, 24, 25], min_length=1
    )
    """0-based indices of the channels that respond to sentences."""

    snr: PositiveFloat = 0.30
    """Signal SD / noise SD of one channel's single-trial response."""

    signal_sd: PositiveFloat = 1.0
    """SD of the response across sentences, in stream units."""

    mean_level: float = 2.0
    """Response to the pool's average sentence, in stream units."""

    latency_s: NonNegativeFloat = 0.1
    """Delay from onset to the start of the response, in seconds."""

    response_duration_s: PositiveFloat = 1.0
    """Duration of the response, in seconds."""

    baseline_s: PositiveFloat = 0.5
    """Length of the pre-stimulus window the SNR is defined against, in seconds."""

    readout_weight: float = 1.0
    """Weight of the sentence-embedding readout in the truth, in pool SDs."""

    surprisal_weight: float = 1.0
    """Weight of the surprisal term in the truth, in pool SDs."""

    surprisal_model: str = "embedded:smollm2-135m"
    """Language model that computes the surprisal term."""

    photodiode_lag_s: NonNegativeFloat | None = None
    """Add a photodiode channel `PHOTO` that lights up this long after each onset; leave out for none."""

    seed: int = 7
    """Seed of the readout, the channel gains and the noise."""

    @field_validator("target_channels")
    @classmethod
    def _unique(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("target_channels lists a channel twice")
        return value

    @model_validator(mode="after")
    def _in_range(self) -> SimulatorSettings:
        outside = [index for index in self.target_channels if index >= self.n_channels]
        if outside:
            raise ValueError(f"target_channels {outside} are outside 0..{self.n_channels - 1}")
        return self


class ScannerSettings(Settings):
    tr_s: PositiveFloat = 2.0
    """Repetition time: one volume per TR, in seconds."""

    n_dummy_scans: Annotated[int, Field(ge=0)] = 4
    """Volumes at the start of a run that are discarded; their pulses are counted but not used."""

    trigger: Literal["key", "serial", "lsl"] = "key"
    """Source of the sync pulses: a key press, a serial (TTL) line, or an LSL marker stream."""

    trigger_key: str = "5"
    """Key the scanner's trigger box sends for each pulse."""

    serial_port: str | None = None
    """Serial port of the trigger line (e.g. `COM3` or `/dev/ttyUSB0`), for `trigger = "serial"`."""

    serial_baudrate: Annotated[int, Field(gt=0)] = 115200
    """Baud rate of the serial trigger line."""

    serial_trigger_byte: Annotated[int, Field(ge=0, le=255)] = 53
    """Byte value of one pulse on the serial line (53 is the character `5`)."""

    trigger_stream: str = "neurosteer-scanner-triggers"
    """LSL marker stream of the pulses, for `trigger = "lsl"` (the simulated scanner sends one)."""

    first_pulse_timeout_s: PositiveFloat = 120.0
    """How long the session waits for the first sync pulse, in seconds."""

    min_response_delay_trs: NonNegativeFloat = 0.9
    """Earliest arrival of a volume's values after its pulse, in TRs: a volume is complete one TR
    after its pulse. Values that come sooner point to a missed first pulse."""

    max_response_delay_trs: PositiveFloat = 3.0
    """Latest arrival of a volume's values after its pulse, in TRs; two later ones in a row stop the run."""

    @model_validator(mode="after")
    def _serial_needs_port(self) -> ScannerSettings:
        if self.trigger == "serial" and not self.serial_port:
            raise ValueError('trigger = "serial" needs serial_port')
        return self


class ZmqSettings(Settings):
    address: str = "tcp://127.0.0.1:5570"
    """ZeroMQ endpoint of the per-TR values (see docs/zmq_schema.md)."""

    bind: bool = False
    """Bind the subscriber to the address (the pipeline connects) instead of connecting to it."""

    allow_remote: bool = False
    """Allow an address beyond this machine; off by default so that nothing listens on the network."""

    roi_names: list[str] = Field(default=["language", "control"], min_length=1)
    """ROIs in the order the pipeline sends their values; targets are chosen among them."""

    @field_validator("roi_names")
    @classmethod
    def _distinct_rois(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("roi_names lists an ROI twice")
        return value

    @model_validator(mode="after")
    def _address_on_this_machine(self) -> ZmqSettings:
        from acquisition.zmq_bridge import check_address

        check_address(self.address, self.allow_remote)
        return self


class ScannerSimulatorSettings(Settings):
    target_roi: str = "language"
    """ROI whose response follows the sentences' truth; the others respond equally to every sentence."""

    percent_signal_change: PositiveFloat = 1.0
    """Response of the target ROI to the pool's average sentence, in % of the baseline signal."""

    signal_sd: PositiveFloat = 0.5
    """SD of the target ROI's response across sentences, in % signal change."""

    thermal_noise_sd: NonNegativeFloat = 0.4
    """SD of white noise per volume, in % signal change."""

    physiological_noise_sd: NonNegativeFloat = 0.2
    """SD of the slow cardiac- and respiration-like oscillations, in % signal change."""

    drift_per_minute: float = 0.5
    """Linear scanner drift, in % signal change per minute."""

    processing_delay_s: NonNegativeFloat = 0.4
    """Delay from the end of a volume's acquisition to its values being sent, in seconds."""

    readout_weight: float = 1.0
    """Weight of the sentence-embedding readout in the truth, in pool SDs."""

    surprisal_weight: float = 1.0
    """Weight of the surprisal term in the truth, in pool SDs."""

    surprisal_model: str = "embedded:smollm2-135m"
    """Language model that computes the surprisal term."""

    seed: int = 11
    """Seed of the readout and the noise."""

    volume_folder: str | None = None
    """Folder to also write every volume into (NIfTI, with ROI masks), to exercise `neurosteer bridge`."""


class RigInfo(Settings):
    name: str
    """Name of the rig."""

    kind: Literal["simulated", "ecog", "eeg", "fmri", "simulated_fmri"]
    """`simulated` and `simulated_fmri` start a simulated subject; the others expect live data."""

    description: str = ""
    """Free text stored in the session file."""


class Rig(Settings):
    rig: RigInfo
    lsl: LSLSettings = LSLSettings()
    display: DisplaySettings | None = None
    """The stimulus screen; needed to run with a window."""

    simulator: SimulatorSettings | None = None
    vision_simulator: VisionSimulatorSettings | None = None
    """The simulated subject of vision experiments (sites with receptive fields)."""

    scanner: ScannerSettings | None = None
    """The MRI scanner: TR, dummy scans and sync pulses; needed by fMRI rigs."""

    zmq: ZmqSettings | None = None
    """Source of the per-TR ROI values; needed by fMRI rigs."""

    scanner_simulator: ScannerSimulatorSettings | None = None
    """The simulated scanner of `simulated_fmri` rigs."""

    @model_validator(mode="after")
    def _kind_has_its_tables(self) -> Rig:
        kind = self.rig.kind
        if kind == "simulated" and self.simulator is None and self.vision_simulator is None:
            raise ValueError("a rig of kind 'simulated' needs a [simulator] (sentences) or a "
                             "[vision_simulator] (images) table")
        if kind in ("fmri", "simulated_fmri"):
            missing = [name for name in ("scanner", "zmq") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"a rig of kind {kind!r} needs the tables "
                                 + ", ".join(f"[{name}]" for name in missing))
        if kind == "simulated_fmri":
            if self.scanner_simulator is None:
                raise ValueError("a rig of kind 'simulated_fmri' needs a [scanner_simulator] table")
            if self.scanner.trigger == "serial":
                raise ValueError('the simulated scanner sends its pulses over LSL, or as key presses '
                                 'from PsychoPy\'s MRI emulator: set scanner.trigger to "lsl" or "key"')
            if self.scanner_simulator.target_roi not in self.zmq.roi_names:
                raise ValueError(f"scanner_simulator.target_roi {self.scanner_simulator.target_roi!r} "
                                 f"is not in zmq.roi_names {self.zmq.roi_names}")
        return self

    @property
    def is_fmri(self) -> bool:
        return self.rig.kind in ("fmri", "simulated_fmri")


def _format_location(location: tuple) -> str:
    parts = [str(part) for part in location if not str(part).startswith("function-after")]
    return ".".join(parts) if parts else "(top level)"


def _load_toml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found.")
    raw = path.read_bytes()
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not valid UTF-8 at byte {err.start} (line {line}); save the file as UTF-8."
        ) from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}.") from err


# Experiment files that extend a base file

EXTENDS_KEY = "extends"

# Keys whose relative paths are taken relative to the file that sets them. When a base file in
# another folder sets one, the merge makes it absolute, so that it names the same file.
PATH_KEYS = (("pool", "file"), ("presentation", "font_file"), ("experiment", "plugins"))


@dataclass(frozen=True)
class MergedToml:
    """An experiment file's content merged over the base files it extends.

    ``origins`` maps the path of every value a file set (tables excluded) to that file. ``chain``
    lists the files from the one read to its last base.
    """

    content: dict
    origins: dict[tuple[str, ...], Path]
    chain: tuple[Path, ...]

    def file_of(self, key_path: tuple[str, ...]) -> Path:
        """Return the file that set ``key_path``; the file read when none did (a default)."""
        return self.origins.get(key_path, self.chain[0])

    def files_under(self, key_path: tuple[str, ...]) -> list[Path]:
        """Return the files that set ``key_path`` or a key below it, the file read first."""
        found = {file for path, file in self.origins.items() if path[:len(key_path)] == key_path}
        return [file for file in self.chain if file in found]


def _read_chain(path: Path) -> list[tuple[Path, dict, str | None]]:
    """Read ``path`` and the bases it extends, in that order: (file, content, its `extends`)."""
    layers: list[tuple[Path, dict, str | None]] = []
    seen: list[Path] = []
    current = path
    while True:
        if current.resolve() in seen:
            cycle = " -> ".join(str(file) for file, _, _ in layers) + f" -> {current}"
            raise ConfigError(f"{layers[-1][0]}: {EXTENDS_KEY}: the files extend each other in a "
                              f"cycle: {cycle}. Remove the `{EXTENDS_KEY}` that closes it.")
        seen.append(current.resolve())
        content = _load_toml(current)
        value = content.pop(EXTENDS_KEY, None)
        layers.append((current, content, value))
        if value is None:
            return layers
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{current}: {EXTENDS_KEY}: expected the path of a base experiment "
                              f"file, relative to this file (got {value!r}).")
        base = Path(value).expanduser()
        base = base if base.is_absolute() else current.parent / base
        if not base.is_file():
            raise ConfigError(f"{current}: {EXTENDS_KEY}: base file {value!r} not found (tried "
                              f"{base}). Correct the path; it is relative to this file.")
        current = base


def _make_paths_absolute(content: dict, folder: Path) -> None:
    for table, key in PATH_KEYS:
        section = content.get(table)
        value = section.get(key) if isinstance(section, dict) else None
        if isinstance(value, str) and not value.startswith(BUILTIN_PREFIX):
            section[key] = str(resolve_data_path(value, folder))
        elif isinstance(value, list):
            section[key] = [str(resolve_data_path(item, folder)) if isinstance(item, str) else item
                            for item in value]


def _merge(target: dict, source: dict, file: Path, prefix: tuple[str, ...],
           origins: dict[tuple[str, ...], Path]) -> None:
    """Merge ``source``, read from ``file``, over ``target``: tables key by key, the rest replaced."""
    for key, value in source.items():
        key_path = (*prefix, key)
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, file, key_path, origins)
            continue
        # A value, a list or a table in place of a value: whatever the base set here goes.
        for replaced in [path for path in origins if path[:len(key_path)] == key_path]:
            del origins[replaced]
        if isinstance(value, dict):
            target[key] = {}
            _merge(target[key], value, file, key_path, origins)
        else:
            target[key] = value
            origins[key_path] = file


def read_experiment_toml(path: Path | str) -> MergedToml:
    """Read an experiment file and merge it over the chain of base files it extends.

    The file's own ``extends`` stays in the content (it is a key of the schema); the bases' are
    consumed. Raise ConfigError naming the file and the ``extends`` key for a missing base, a
    value that is not a path, or a cycle.
    """
    path = Path(path)
    layers = _read_chain(path)
    content: dict = {}
    origins: dict[tuple[str, ...], Path] = {}
    for file, layer, _ in reversed(layers):
        if file.parent.resolve() != path.parent.resolve():
            _make_paths_absolute(layer, file.parent)
        _merge(content, layer, file, (), origins)
    extends = layers[0][2]
    if extends is not None:
        content[EXTENDS_KEY] = extends
        origins[(EXTENDS_KEY,)] = path
    return MergedToml(content, origins, tuple(file for file, _, _ in layers))


def _problem_file(location: tuple, path: Path, merged: MergedToml | None) -> tuple[Path, str]:
    """Return the file a validation problem comes from, and a note when several files set its table."""
    if merged is None or len(merged.chain) == 1:
        return path, ""
    key_path = tuple(str(part) for part in location if not str(part).startswith("function-after"))
    for length in range(len(key_path), 0, -1):
        if key_path[:length] in merged.origins:
            return merged.origins[key_path[:length]], ""
    # A table-level problem (a validator, a missing key): the files that set keys in that table.
    files = merged.files_under(key_path)
    if not files:
        return path, ""
    if len(files) == 1:
        return files[0], ""
    return files[0], " (merged from " + " and ".join(str(file) for file in files) + ")"


def _validate(model: type[Settings], path: Path, content: dict, merged: MergedToml | None = None):
    try:
        return model.model_validate(content)
    except ValidationError as err:
        lines = []
        for problem in err.errors():
            key = _format_location(problem["loc"])
            file, note = _problem_file(problem["loc"], path, merged)
            message = problem["msg"]
            if problem["type"] == "extra_forbidden":
                message = "unknown key; check its spelling against docs/experiment_format.md or remove it"
            elif problem["type"] == "missing":
                message = "required key is missing"
            elif "input" in problem and not isinstance(problem["input"], dict):
                message = f"{message} (got {problem['input']!r})"
            # pydantic prefixes the messages of validators with "Value error, ".
            message = message.removeprefix("Value error, ")
            lines.append(f"{file}: {key}: {message}{note}")
        raise ConfigError("\n".join(lines)) from None


def load_experiment(path: Path | str) -> Experiment:
    """Read and validate an experiment file and its bases; raise ConfigError listing every problem."""
    path = Path(path)
    merged = read_experiment_toml(path)
    experiment = _validate(Experiment, path, merged.content, merged)
    pool_file = resolve_data_path(experiment.pool.file, path.parent)
    if not pool_file.is_file():
        raise ConfigError(f"{merged.file_of(('pool', 'file'))}: pool.file: file {pool_file} not found.")
    font_file = experiment.presentation.font_file
    if font_file is not None and not resolve_data_path(font_file, path.parent).is_file():
        raise ConfigError(f"{merged.file_of(('presentation', 'font_file'))}: presentation.font_file: "
                          f"file {font_file} not found.")
    _check_registered_names(experiment, path, merged)
    return experiment


def _check_registered_names(experiment: Experiment, path: Path, merged) -> None:
    """Import the experiment's plugins, then check every registered name it uses; list each miss."""
    from loop import registry

    plugins_file = merged.file_of(("experiment", "plugins"))
    try:
        registry.load_plugins([resolve_data_path(item, path.parent)
                               for item in experiment.experiment.plugins])
    except ImportError as err:
        raise ConfigError(f"{plugins_file}: experiment.plugins: {err}") from None
    loop = experiment.closed_loop
    uses = [(("closed_loop", "selection"), loop.selection, registry.SELECTIONS),
            (("closed_loop", "order"), loop.order, registry.ORDERS),
            (("closed_loop", "stop_rule"), loop.stop_rule, registry.STOP_RULES)]
    uses += [(("closed_loop", "extra_conditions", name), name, registry.CONDITIONS)
             for name in loop.extra_conditions]
    problems = [f"{merged.file_of(key[:2])}: {'.'.join(key)}: no {entries.kind} named {name!r} "
                f"is registered (registered: {', '.join(entries.names())}); register it in a "
                "plugin listed in experiment.plugins"
                for key, name, entries in uses if name not in entries]
    if problems:
        raise ConfigError("\n".join(problems))


def effective_experiment_text(experiment: Experiment) -> str:
    """Return every setting of a loaded experiment, bases and defaults included, as JSON.

    The session file stores it beside the verbatim text, which lacks what the bases set. JSON,
    because the standard library reads TOML but cannot write it.
    ``Experiment.model_validate(json.loads(text))`` gives the experiment back.
    """
    return json.dumps(experiment.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"


def load_rig(path: Path | str) -> Rig:
    """Read and validate a rig file; raise ConfigError listing every problem."""
    path = Path(path)
    rig = _validate(Rig, path, _load_toml(path))
    config = rig.lsl.config
    if config != "builtin:loopback" and config != "default":
        if not resolve_data_path(config, path.parent).is_file():
            raise ConfigError(f"{path}: lsl.config: file {config} not found.")
    return rig


def resolve_data_path(value: str, base: Path) -> Path:
    """Resolve ``builtin:NAME`` to the shipped data folder and relative paths against ``base``."""
    if value.startswith(BUILTIN_PREFIX):
        return PACKAGE_DATA / value[len(BUILTIN_PREFIX):]
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def lsl_config_path(rig: Rig, rig_path: Path) -> Path | None:
    """Return the liblsl configuration file of a rig (None keeps liblsl's lab-network defaults)."""
    from acquisition.lsl import LOOPBACK_CONFIG

    if rig.lsl.config == "builtin:loopback":
        return LOOPBACK_CONFIG
    if rig.lsl.config == "default":
        return None
    return resolve_data_path(rig.lsl.config, rig_path.parent)
