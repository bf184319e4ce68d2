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
    model_config = ConfigDict(extra="forbid", frozen=True)


# Experiment file


class ExperimentInfo(Settings):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    seed: int = 0


class ModelSettings(Settings):
    name: str = "embedded:gemma3-270m"
    layers: list[Annotated[int, Field(ge=1)]] = Field(default=[6, 9, 12, 15], min_length=1)
    pooling: Literal["mean", "last"] = "mean"
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    device: str = "auto"
    batch_size: Annotated[int, Field(ge=1)] = 64


class PoolSettings(Settings):
    file: str = "builtin:pool_gemma3_270m_6w.txt"
    column: str = "sentence"
    n_words: Annotated[int, Field(ge=1)] | None = 6


class EncodingSettings(Settings):
    alpha_min: PositiveFloat = 1e-1
    alpha_max: PositiveFloat = 1e6
    n_alphas: Annotated[int, Field(ge=2)] = 29
    exploration: NonNegativeFloat = 1.0

    @model_validator(mode="after")
    def _alpha_order(self) -> EncodingSettings:
        if self.alpha_max <= self.alpha_min:
            raise ValueError("alpha_max must be larger than alpha_min")
        return self


class ResponseSettings(Settings):
    target_channels: list[str] = Field(min_length=1)
    tmin_s: float = 0.1
    tmax_s: float = 1.1
    baseline_s: tuple[float, float] = (-0.5, 0.0)

    @model_validator(mode="after")
    def _windows(self) -> ResponseSettings:
        if self.tmax_s <= self.tmin_s:
            raise ValueError("tmax_s must be larger than tmin_s")
        if self.baseline_s[1] <= self.baseline_s[0]:
            raise ValueError("baseline_s must be [start, end] with start < end")
        return self


class TimingSettings(Settings):
    stimulus_duration_s: PositiveFloat = 2.0
    iti_s: NonNegativeFloat = 1.0
    iti_jitter_s: NonNegativeFloat = 0.2
    max_late_onsets: Annotated[int, Field(ge=1)] = 10


class CalibrationSettings(Settings):
    n_trials: Annotated[int, Field(ge=10)] = 150


class ClosedLoopSettings(Settings):
    n_blocks: Annotated[int, Field(ge=0)] = 4
    n_drive: Annotated[int, Field(ge=0)] = 12
    n_suppress: Annotated[int, Field(ge=0)] = 12
    n_baseline: Annotated[int, Field(ge=0)] = 12


class EvaluationSettings(Settings):
    n_per_condition: Annotated[int, Field(ge=2)] = 30


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
    data_stream: str = "neurosteer-sim-ecog"
    marker_stream: str = "neurosteer-markers"
    resolve_timeout_s: PositiveFloat = 10.0


class DisplaySettings(Settings):
    size_pix: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]] = (1280, 1024)
    fullscreen: bool = False
    screen: Annotated[int, Field(ge=0)] = 0
    background_color: str = "black"
    text_color: str = "white"
    monitor_width_cm: PositiveFloat = 53.0
    viewing_distance_cm: PositiveFloat = 60.0
    font: str = "Arial"
    text_height: PositiveFloat = 0.05
    wrap_width: PositiveFloat = 1.2


class SimulatorSettings(Settings):
    n_channels: Annotated[int, Field(ge=1)] = 64
    sfreq: PositiveFloat = 1000.0
    target_channels: list[Annotated[int, Field(ge=0)]] = Field(
        default=[8, 9, 10, 11, 16, 17, 18, 19, 24, 25], min_length=1
    )
    snr: PositiveFloat = 0.30
    signal_sd: PositiveFloat = 1.0
    mean_level: float = 2.0
    latency_s: NonNegativeFloat = 0.1
    response_duration_s: PositiveFloat = 1.0
    baseline_s: PositiveFloat = 0.5
    readout_weight: float = 1.0
    surprisal_weight: float = 1.0
    surprisal_model: str = "embedded:smollm2-135m"
    seed: int = 7

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
    kind: Literal["simulated", "ecog", "eeg"]
    description: str = ""


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
                message = "unknown key; check its spelling against docs/ or remove it"
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
