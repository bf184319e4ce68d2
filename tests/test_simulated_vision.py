"""The simulated vision subject over real LSL on loopback: channels, responses, truth and errors.

One simulator process (spawn) serves the module's stream tests. The ``session`` fixture sends it
onset markers naming image files, records its stream until the last response is over, and then ends
it with a ``session_end`` marker. The test process computes the same truth itself to check the log.
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from acquisition.epochs import ResponseWindow, epoch_response, light_onset_lag
from acquisition.lsl import LOOPBACK_CONFIG, DataInlet, MarkerOutlet
from acquisition.simulated import read_log
from acquisition.simulated_vision import (
    VisionSimulatorConfig,
    VisionSimulatorProcess,
    natural_truth_file,
    read_natural_truth,
    read_stimulus_image,
    vision_channel_names,
    vision_simulator_config,
)
from acquisition.vision_truth import VisionTruth
from synth.natural_images import load_natural_images
from synth.vision_models import load_vision_model

pytestmark = [pytest.mark.models, pytest.mark.usefixtures("torch_one_thread")]

N_SITES = 8
SEED = 5
SFREQ = 1000.0
LATENCY_S = 0.05
DURATION_S = 0.3
BASELINE_S = 0.2
PHOTODIODE_LAG_S = 0.02
MEAN_LEVEL = 2.0
SIGNAL_SD = 1.5
# A trial's noise SD is SIGNAL_SD / SNR = 1.5e-4, far below the tolerance of the response checks.
SNR = 1e4
# Onsets are stamped this far after their markers are sent, so a busy machine that delivers a
# marker late still schedules its response before the simulator renders the response's samples.
MARKER_LEAD_S = 0.3
# The next onset's baseline starts after this onset's response has ended (0.35 s after it).
ONSET_SPACING_S = 0.6
WINDOW = ResponseWindow(LATENCY_S, LATENCY_S + DURATION_S, -BASELINE_S, 0.0)
START_TIMEOUT_S = 180.0
WAIT_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def natural():
    return load_natural_images()


@pytest.fixture(scope="module")
def reference_truth(natural) -> VisionTruth:
    """The truth the simulator should use, built here with VisionTruth's own defaults."""
    return VisionTruth(N_SITES, SEED, natural.images, model=load_vision_model(device="cpu"),
                       use_cache=False)


def write_images(folder: Path, natural) -> dict[str, np.ndarray]:
    """Write the test's stimuli as 64 × 64 images, and return them by stimulus id."""
    images = {
        "natural-0": np.ascontiguousarray(natural.images[0, ::4, ::4]),
        "grey": np.full((64, 64, 3), 128, np.uint8),
        "natural-png": np.ascontiguousarray(natural.images[7, ::4, ::4]),
        "natural-20": np.ascontiguousarray(natural.images[20, ::4, ::4]),
    }
    for stimulus_id, image in images.items():
        if stimulus_id.endswith("png"):
            Image.fromarray(image).save(folder / f"{stimulus_id}.png")
        else:
            np.save(folder / f"{stimulus_id}.npy", image)
    return images


def onset_events(folder: Path) -> list[dict]:
    """Return the onset markers in sending order: images, a missing file and a text stimulus."""
    files = {
        "natural-0": folder / "natural-0.npy",
        "missing": folder / "missing.npy",
        "text": None,
        "grey": folder / "grey.npy",
        "natural-png": folder / "natural-png.png",
        "natural-20": folder / "natural-20.npy",
    }
    events = []
    for trial, (stimulus_id, path) in enumerate(files.items()):
        event = {"type": "onset", "trial": trial, "condition": "baseline",
                 "stimulus_id": stimulus_id, "text": "", "duration_s": 0.1}
        if path is not None:
            event["image_file"] = str(path)
        else:
            event["text"] = "A sentence, not an image."
        events.append(event)
    return events


def record_until(inlet: DataInlet, end_time: float, chunks: list) -> None:
    """Pull the stream into ``chunks`` until it reaches ``end_time`` on the LSL clock."""
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not chunks or chunks[-1][1][-1] < end_time:
        if time.monotonic() > deadline:
            raise TimeoutError(f"The simulated stream did not reach {end_time:.3f} s within "
                               f"{WAIT_TIMEOUT_S:g} s.")
        data, times = inlet.pull(timeout_s=0.1)
        if len(times):
            chunks.append((data, times))


@pytest.fixture(scope="module")
def session(tmp_path_factory, natural):
    """Run the simulator through six onsets and a session end; return what it streamed and logged."""
    import pylsl

    folder = tmp_path_factory.mktemp("vision_simulator")
    images = write_images(folder, natural)
    events = onset_events(folder)
    name = f"neurosteer-test-vision-simulator-{os.getpid()}"
    config = VisionSimulatorConfig(
        data_stream=f"{name}-data", marker_stream=f"{name}-markers", source_id=f"{name}-source",
        log_file=str(folder / "simulator.jsonl"), lsl_config=str(LOOPBACK_CONFIG), n_sites=N_SITES,
        sfreq=SFREQ, snr=SNR, signal_sd=SIGNAL_SD, mean_level=MEAN_LEVEL, latency_s=LATENCY_S,
        response_duration_s=DURATION_S, baseline_s=BASELINE_S, seed=SEED,
        feature_cache_dir=str(folder / "cache"), photodiode_lag_s=PHOTODIODE_LAG_S,
        marker_timeout_s=START_TIMEOUT_S,
    )
    outlet = MarkerOutlet(config.marker_stream, f"{name}-markers-source")
    simulator = VisionSimulatorProcess(config)
    simulator.start()
    inlet = None
    try:
        simulator.wait_ready(START_TIMEOUT_S)
        inlet = DataInlet(config.data_stream, timeout_s=WAIT_TIMEOUT_S)

        # Send the onsets and record the stream through the last response.
        chunks: list[tuple[np.ndarray, np.ndarray]] = []
        onsets = {}
        for event in events:
            onset = pylsl.local_clock() + MARKER_LEAD_S
            outlet.push(event, onset)
            onsets[event["stimulus_id"]] = onset
            record_until(inlet, onset + ONSET_SPACING_S - MARKER_LEAD_S, chunks)
        record_until(inlet, max(onsets.values()) + WINDOW.end_s + 0.05, chunks)

        outlet.push({"type": "session_end"}, pylsl.local_clock())
        exit_code = simulator.wait_exit(WAIT_TIMEOUT_S)
        description = inlet.description
    finally:
        simulator.stop()
        if inlet is not None:
            inlet.close()
        outlet.close()

    data = np.concatenate([chunk[0] for chunk in chunks]).astype(np.float64)
    times = np.concatenate([chunk[1] for chunk in chunks])
    log = {entry["stimulus_id"]: entry for entry in read_log(config.log_file)}
    trials = {event["stimulus_id"]: event["trial"] for event in events}
    return {"config": config, "images": images, "onsets": onsets, "trials": trials, "data": data,
            "times": times,
            "log": log, "exit_code": exit_code, "description": description}


def test_stream_channels(session):
    description = session["description"]
    expected = tuple(f"SITE00{index}" for index in range(1, 9)) + ("PHOTO",)
    assert description.channel_names == expected
    assert tuple(vision_channel_names(N_SITES, photodiode=True)) == expected
    assert description.stype == "MUA"
    assert description.sfreq == SFREQ
    assert description.n_channels == N_SITES + 1


def test_stream_has_no_gaps(session):
    steps = np.diff(session["times"])
    # A tenth of a sample: the inlet re-measures the clock offset while it runs, and each new
    # estimate moves the stamps by a few microseconds.
    np.testing.assert_allclose(steps, 1.0 / SFREQ, atol=1e-4)


def test_epoched_response_equals_logged_amplitudes(session):
    responded = [key for key, entry in session["log"].items() if "amplitudes" in entry]
    assert sorted(responded) == ["grey", "natural-0", "natural-20", "natural-png"]
    for stimulus_id in responded:
        response = epoch_response(session["data"], session["times"], session["onsets"][stimulus_id],
                                  WINDOW, SFREQ)
        amplitudes = np.array(session["log"][stimulus_id]["amplitudes"])
        np.testing.assert_allclose(response[:N_SITES], amplitudes, rtol=2e-3, atol=1e-3,
                                   err_msg=stimulus_id)


def test_logged_truth_equals_vision_truth(session, reference_truth):
    reference = reference_truth.reference_responses
    mean, sd = reference.mean(axis=0), reference.std(axis=0)
    for stimulus_id, image in session["images"].items():
        entry = session["log"][stimulus_id]
        raw = reference_truth([image])[0]
        np.testing.assert_allclose(entry["truth_raw"], raw, rtol=1e-4, atol=1e-6, err_msg=stimulus_id)
        np.testing.assert_allclose(entry["truth"], (raw - mean) / sd, rtol=1e-4, atol=1e-5,
                                   err_msg=stimulus_id)
        np.testing.assert_allclose(entry["amplitudes"],
                                   MEAN_LEVEL + SIGNAL_SD * np.array(entry["truth"]), rtol=1e-12)
        assert entry["trial"] == session["trials"][stimulus_id]
        assert entry["onset"] == pytest.approx(session["onsets"][stimulus_id], abs=1e-3)


def test_grey_image_drives_sites_differently(session):
    # A flat image still drives each site through the layer's biases, but not like a photograph.
    grey = np.array(session["log"]["grey"]["truth"])
    photograph = np.array(session["log"]["natural-0"]["truth"])
    assert grey.shape == (N_SITES,)
    assert not np.allclose(grey, photograph, atol=1e-3)


def test_natural_truth_file(session, natural, reference_truth):
    truth_path = natural_truth_file(session["config"].log_file)
    assert truth_path.name == "simulator.jsonl.natural_truth.npz"
    arrays = read_natural_truth(truth_path)
    assert arrays["truth"].shape == (len(natural), N_SITES)
    assert arrays["ids"].tolist() == natural.ids
    np.testing.assert_allclose(arrays["truth"].mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(arrays["truth"].std(axis=0), 1.0, rtol=1e-9)
    np.testing.assert_allclose(arrays["truth"],
                               (arrays["truth_raw"] - arrays["raw_mean"]) / arrays["raw_sd"],
                               rtol=1e-12)
    np.testing.assert_allclose(arrays["truth_raw"], reference_truth.reference_responses,
                               rtol=1e-4, atol=1e-6)
    assert arrays["rf_centre_xy"].shape == (N_SITES, 2)
    assert arrays["rf_sd"].tolist() == [site.rf_sd for site in reference_truth.sites]


def test_unreadable_stimuli_logged_and_ignored(session):
    log = session["log"]
    assert "missing.npy" in log["missing"]["error"]
    assert "no image_file" in log["text"]["error"]
    for stimulus_id in ("missing", "text"):
        assert "truth" not in log[stimulus_id]
        assert "amplitudes" not in log[stimulus_id]
        response = epoch_response(session["data"], session["times"], session["onsets"][stimulus_id],
                                  WINDOW, SFREQ)
        np.testing.assert_allclose(response[:N_SITES], 0.0, atol=1e-3, err_msg=stimulus_id)
    # The onset after the failed ones got a response, so the process went on.
    assert "amplitudes" in log["natural-20"]


def test_photodiode_lights_after_each_onset(session):
    light = session["data"][:, N_SITES]
    for stimulus_id, onset in session["onsets"].items():
        lag = light_onset_lag(light, session["times"], onset, 0.2, 0.5)
        # The first sample at or after onset + lag; samples are 1 ms apart.
        assert PHOTODIODE_LAG_S - 1e-4 <= lag <= PHOTODIODE_LAG_S + 1.0 / SFREQ + 1e-4, stimulus_id


def test_process_stops_on_session_end(session):
    assert session["exit_code"] == 0


def test_config_from_settings_table():
    settings = {"n_sites": 4, "snr": 0.5, "rf_sd_range": [0.1, 0.3], "photodiode_lag_s": 0.03}
    config = vision_simulator_config(settings, speed=2.0, data_stream="data", log_file="/tmp/x.jsonl")
    assert config.n_sites == 4
    assert config.rf_sd_range == (0.1, 0.3)
    assert config.speed == 2.0
    assert config.data_stream == "data"
    assert config.marker_stream == ""
    assert config.lsl_config is None
    assert pickle.loads(pickle.dumps(config)) == config


def test_config_rejects_unknown_setting():
    with pytest.raises(ValueError, match=r"Unknown vision simulator settings \['n_channels'\]"):
        vision_simulator_config({"n_channels": 4})


@pytest.mark.parametrize(("setting", "message"), [
    ({"snr": 0.0}, "snr must be positive"),
    ({"n_sites": 0}, "n_sites must be at least 1"),
    ({"rf_sd_range": [0.3, 0.1]}, "rf_sd_range must be"),
    ({"photodiode_lag_s": -0.01}, "photodiode_lag_s must be 0 or more"),
])
def test_config_rejects_invalid_value(setting, message):
    with pytest.raises(ValueError, match=message):
        vision_simulator_config(setting)


def test_read_stimulus_image_formats(tmp_path):
    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    np.save(tmp_path / "rgb.npy", pixels)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    Image.fromarray(pixels[..., 0]).save(tmp_path / "grey.png")
    np.save(tmp_path / "float.npy", pixels / 255.0)
    np.testing.assert_array_equal(read_stimulus_image(str(tmp_path / "rgb.npy")), pixels)
    np.testing.assert_array_equal(read_stimulus_image(str(tmp_path / "rgb.png")), pixels)
    np.testing.assert_array_equal(read_stimulus_image(str(tmp_path / "grey.png")), pixels[..., 0])
    np.testing.assert_allclose(read_stimulus_image(str(tmp_path / "float.npy")), pixels / 255.0)


def test_read_stimulus_image_rejects(tmp_path):
    np.save(tmp_path / "four_channels.npy", np.zeros((4, 4, 4), np.uint8))
    np.save(tmp_path / "too_bright.npy", np.full((4, 4, 3), 2.0))
    np.save(tmp_path / "integers.npy", np.zeros((4, 4, 3), np.int32))
    with pytest.raises(ValueError, match="no image_file"):
        read_stimulus_image(None)
    with pytest.raises(ValueError, match="relative path"):
        read_stimulus_image("image.npy")
    with pytest.raises(ValueError, match=r"shape \(4, 4, 4\)"):
        read_stimulus_image(str(tmp_path / "four_channels.npy"))
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        read_stimulus_image(str(tmp_path / "too_bright.npy"))
    with pytest.raises(ValueError, match="int32 pixels"):
        read_stimulus_image(str(tmp_path / "integers.npy"))
    with pytest.raises(FileNotFoundError):
        read_stimulus_image(str(tmp_path / "missing.npy"))
