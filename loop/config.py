"""Experiment and rig files: TOML, validated by pydantic models before anything starts.

Runs in the process that starts a session (the ``neurosteer`` command). Every setting is typed and
frozen, unknown keys are rejected, and each problem is reported as one line naming the file, the key
and what is expected. Relative paths in a file are taken relative to that file.
"""

from __future__ import annotations

import tomllib
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


class CalibrationSettings(Settings):
    n_trials: Annotated[int, Field(ge=10)] = 150
    """Diverse pool sentences shown before the first model fit."""


class ClosedLoopSettings(Settings):
    n_blocks: Annotated[int, Field(ge=0)] = 4
    """Closed-loop blocks; the penalty is re-chosen after each block."""

    n_drive: Annotated[int, Field(ge=0)] = 12
    """Drive trials per block."""

    n_suppress: Annotated[int, Field(ge=0)] = 12
    """Suppress trials per block."""

    n_baseline: Annotated[int, Field(ge=0)] = 12
    """Baseline trials (random pool sentences) per block."""


class EvaluationSettings(Settings):
    n_per_condition: Annotated[int, Field(ge=2)] = 50
    """Fresh drive, suppress and baseline sentences each, chosen by the final model."""


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
    allow_repeats: bool = False
    """Let the closed loop show a sentence again; evaluation sentences are always new."""

    @model_validator(mode="after")
    def _window_fits_trial(self) -> Experiment:
        soa = self.timing.stimulus_duration_s + self.timing.iti_s - self.timing.iti_jitter_s
        if self.response.tmax_s >= soa:
            raise ValueError(
                f"response.tmax_s ({self.response.tmax_s} s) must end before the next onset "
                f"(shortest onset interval {soa:g} s)"
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


class DisplaySettings(Settings):
    size_pix: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]] = (1280, 1024)
    """Window size in pixels [width, height]."""

    fullscreen: bool = False
    """Open the window full screen."""

    screen: Annotated[int, Field(ge=0)] = 0
    """Index of the screen the window opens on."""

    background_color: str = "black"
    """Background colour (a PsychoPy colour name)."""

    text_color: str = "white"
    """Text colour (a PsychoPy colour name)."""

    monitor_width_cm: PositiveFloat = 53.0
    """Visible width of the monitor, in cm."""

    viewing_distance_cm: PositiveFloat = 60.0
    """Distance from the eyes to the screen, in cm."""

    font: str = "Arial"
    """Font of the sentences."""

    text_height: PositiveFloat = 0.05
    """Letter height, in units of the window height."""

    wrap_width: PositiveFloat = 1.2
    """Width at which text wraps, in units of the window height."""


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


class RigInfo(Settings):
    name: str
    """Name of the rig."""

    kind: Literal["simulated", "ecog", "eeg"]
    """`simulated` starts the simulated subject; `ecog` and `eeg` expect a live stream."""

    description: str = ""
    """Free text stored in the session file."""


class Rig(Settings):
    rig: RigInfo
    lsl: LSLSettings = LSLSettings()
    display: DisplaySettings = DisplaySettings()
    simulator: SimulatorSettings | None = None

    @model_validator(mode="after")
    def _simulated_needs_simulator(self) -> Rig:
        if self.rig.kind == "simulated" and self.simulator is None:
            raise ValueError("a rig of kind 'simulated' needs a [simulator] table")
        return self


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


def _validate(model: type[Settings], path: Path, content: dict):
    try:
        return model.model_validate(content)
    except ValidationError as err:
        lines = []
        for problem in err.errors():
            key = _format_location(problem["loc"])
            message = problem["msg"]
            if problem["type"] == "extra_forbidden":
                message = "unknown key; check its spelling against docs/experiment_format.md or remove it"
            elif problem["type"] == "missing":
                message = "required key is missing"
            elif "input" in problem and not isinstance(problem["input"], dict):
                message = f"{message} (got {problem['input']!r})"
            lines.append(f"{path}: {key}: {message}")
        raise ConfigError("\n".join(lines)) from None


def load_experiment(path: Path | str) -> Experiment:
    """Read and validate an experiment file; raise ConfigError listing every problem."""
    path = Path(path)
    experiment = _validate(Experiment, path, _load_toml(path))
    pool_file = resolve_data_path(experiment.pool.file, path.parent)
    if not pool_file.is_file():
        raise ConfigError(f"{path}: pool.file: file {pool_file} not found.")
    return experiment


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
