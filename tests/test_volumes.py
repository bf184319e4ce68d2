"""The volume bridge: real NIfTI and DICOM files in a temporary folder, and real ZeroMQ on loopback."""

from __future__ import annotations

import gzip
import io
import logging
import threading
import time
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest

from acquisition.volumes import (
    FilePattern,
    MaskShapeError,
    RoiMasks,
    VolumeBridge,
    VolumeWatcher,
    encode_dicom,
    encode_nifti,
    write_dicom_volume,
    write_in_parts,
    write_volume,
)
from acquisition.zmq_bridge import TRMessage, TRPublisher, TRSubscriber

ROIS = ("left", "right")
SHAPE = (4, 5, 3)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
WAIT_S = 10.0
LOOPBACK = "tcp://127.0.0.1:0"
# nibabel ships a Siemens mosaic (one 128 x 128 x 48 volume, InstanceNumber 2) with its DICOM tests.
SIEMENS_MOSAIC = Path(nibabel.__file__).parent / "nicom" / "tests" / "data" / "siemens_dwi_1000.dcm.gz"


def volume_data(tr_index: int) -> np.ndarray:
    """Return the int16 volume of TR ``tr_index``: voxel values 0 to 59 plus 100 per TR."""
    return (np.arange(60).reshape(SHAPE) + 100 * tr_index).astype(np.int16)


def expected_means(tr_index: int) -> list[float]:
    # "left" is x in {0, 1}, the values 0 to 29. "right" is x in {2, 3}, the values 30 to 59.
    return [14.5 + 100 * tr_index, 44.5 + 100 * tr_index]


def half_masks() -> RoiMasks:
    left = np.zeros(SHAPE, dtype=bool)
    left[:2] = True
    return RoiMasks({"left": left, "right": ~left})


def nifti_watcher(folder: Path, pattern: str = "vol_{tr:04d}.nii", **options) -> VolumeWatcher:
    options.setdefault("settle_s", 0.0)
    options.setdefault("volume_format", "nifti")
    return VolumeWatcher(folder, pattern, **options)


def append(path: Path, raw: bytes) -> None:
    with path.open("ab") as file:
        file.write(raw)


@pytest.fixture
def publisher_subscriber():
    publisher = TRPublisher(LOOPBACK)
    subscriber = TRSubscriber(publisher.address, roi_names=ROIS)
    publisher.wait_for_subscribers(1, timeout_s=WAIT_S)
    yield publisher, subscriber
    subscriber.close()
    publisher.close(linger_s=0)


def receive(subscriber: TRSubscriber, n_messages: int, poll=None) -> list[TRMessage]:
    """Poll until ``n_messages`` arrived, calling ``poll()`` between reads. Fail after ``WAIT_S``."""
    messages: list[TRMessage] = []
    deadline = time.monotonic() + WAIT_S
    while len(messages) < n_messages:
        if time.monotonic() > deadline:
            pytest.fail(f"Timed out after {WAIT_S} s with {len(messages)} of {n_messages} messages.")
        if poll is not None:
            poll()
        messages += subscriber.poll(timeout_s=0.02)
    return messages


# Completeness


@pytest.mark.parametrize("name", ["vol_0002.nii", "vol_0002.nii.gz"])
def test_two_part_write_read_when_complete(tmp_path, name):
    raw = encode_nifti(volume_data(2), AFFINE, compress=name.endswith(".gz"))
    whole = tmp_path / "whole" / name
    whole.parent.mkdir()
    whole.write_bytes(raw)
    folder = tmp_path / "scanner"
    folder.mkdir()
    watcher = nifti_watcher(folder, "vol_{tr:04d}.nii*")
    path = folder / name
    half = len(raw) // 2

    path.write_bytes(raw[:half])
    assert watcher.poll(now=0.0) == []
    assert list(watcher.pending) == [name]

    append(path, raw[half:])
    volumes = watcher.poll(now=1.0)
    assert [volume.tr_index for volume in volumes] == [2]
    masks = half_masks()
    from_bridge = masks.roi_means(volumes[0].data)
    from_whole = masks.roi_means(nibabel.load(whole).get_fdata())
    assert from_bridge.tolist() == from_whole.tolist()
    assert from_bridge.tolist() == expected_means(2)
    assert watcher.pending == {}
    assert watcher.poll(now=2.0) == []


@pytest.mark.parametrize("compress", [False, True])
def test_cut_nifti_never_complete(tmp_path, compress):
    raw = encode_nifti(volume_data(0), AFFINE, compress=compress)
    if compress:
        # Empty, inside the gzip header, inside the deflate stream, inside the CRC and size trailer.
        cuts = [0, 1, 10, len(raw) // 2, len(raw) - 8, len(raw) - 1]
    else:
        # Empty, inside the header, header only, header and extension flag, one byte short.
        cuts = [0, 1, 100, 348, 352, len(raw) - 1]
    watcher = nifti_watcher(tmp_path, "vol_{tr:04d}.nii*")
    path = tmp_path / ("vol_0000.nii.gz" if compress else "vol_0000.nii")
    for step, cut in enumerate(cuts):
        path.write_bytes(raw[:cut])
        assert watcher.poll(now=float(step)) == [], f"cut at {cut} of {len(raw)} bytes"
    path.write_bytes(raw)
    assert len(watcher.poll(now=100.0)) == 1


def test_gzip_bad_crc_never_complete(tmp_path):
    raw = bytearray(encode_nifti(volume_data(0), AFFINE, compress=True))
    raw[-8] ^= 0xFF
    (tmp_path / "vol_0000.nii.gz").write_bytes(bytes(raw))
    watcher = nifti_watcher(tmp_path, "vol_{tr:04d}.nii.gz")

    assert watcher.poll(now=0.0) == []
    assert "CRC" in watcher.pending["vol_0000.nii.gz"]


def test_settle_time_waits_for_unchanged_file(tmp_path):
    raw = encode_nifti(volume_data(0), AFFINE)
    path = tmp_path / "vol_0000.nii"
    watcher = nifti_watcher(tmp_path, settle_s=0.5)

    path.write_bytes(raw[:200])
    assert watcher.poll(now=0.0) == []
    append(path, raw[200:])
    # The file is complete now, but it changed since the last poll, so the settle time starts again.
    assert watcher.poll(now=0.6) == []
    assert watcher.poll(now=1.0) == []
    assert [volume.tr_index for volume in watcher.poll(now=1.1)] == [0]


def test_stalled_file_warned_once_never_read(tmp_path, caplog):
    raw = encode_nifti(volume_data(0), AFFINE)
    (tmp_path / "vol_0000.nii").write_bytes(raw[:-10])
    watcher = nifti_watcher(tmp_path, settle_s=0.1, stall_warning_s=5.0)

    with caplog.at_level(logging.WARNING, logger="acquisition.volumes"):
        for now in (0.0, 0.1, 1.0, 5.0, 60.0):
            assert watcher.poll(now) == []
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "vol_0000.nii" in warnings[0]
    assert f"of the {len(raw)} bytes" in warnings[0]


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, b"not a volume " * 100])
def test_garbage_file_does_not_crash(tmp_path, content):
    (tmp_path / "vol_0000.nii").write_bytes(content)
    watcher = nifti_watcher(tmp_path)

    assert watcher.poll(now=0.0) == []
    assert "vol_0000.nii" in watcher.pending


def test_folder_matching_pattern_ignored(tmp_path):
    (tmp_path / "vol_0000.nii").mkdir()
    watcher = nifti_watcher(tmp_path)

    assert watcher.poll(now=0.0) == []
    assert watcher.pending == {}


def test_series_file_not_a_volume(tmp_path):
    write_volume(tmp_path / "vol_0000.nii", np.zeros(SHAPE + (2,), dtype=np.int16), AFFINE)
    write_volume(tmp_path / "vol_0001.nii", volume_data(1)[..., np.newaxis], AFFINE)
    watcher = nifti_watcher(tmp_path)

    volumes = watcher.poll(now=0.0)
    assert [volume.tr_index for volume in volumes] == [1]
    assert volumes[0].data.shape == SHAPE
    assert "more than one volume" in watcher.pending["vol_0000.nii"]


def test_file_removed_while_pending(tmp_path):
    path = tmp_path / "vol_0000.nii"
    path.write_bytes(encode_nifti(volume_data(0), AFFINE)[:100])
    watcher = nifti_watcher(tmp_path)

    assert watcher.poll(now=0.0) == []
    path.unlink()
    assert watcher.poll(now=1.0) == []
    assert watcher.pending == {}


# DICOM


def test_dicom_two_part_write(tmp_path):
    pixels = (np.arange(24).reshape(4, 6) * 3).astype(np.uint16)
    raw = encode_dicom(pixels, instance_number=4, rescale_slope=0.5, rescale_intercept=1.0)
    path = tmp_path / "MR_0004.dcm"
    watcher = VolumeWatcher(tmp_path, "*.dcm", settle_s=0.0)

    path.write_bytes(raw[: len(raw) // 2])
    assert watcher.poll(now=0.0) == []
    # pydicom 3.0.2 reads a file cut inside its pixel data without an error, but the watcher must not.
    path.write_bytes(raw[:-1])
    assert len(pydicom.dcmread(path).PixelData) == pixels.nbytes - 1
    assert watcher.poll(now=1.0) == []
    assert "47 of the 48 bytes" in watcher.pending["MR_0004.dcm"]

    append(path, raw[-1:])
    volumes = watcher.poll(now=2.0)
    assert [volume.tr_index for volume in volumes] == [3]
    assert volumes[0].data.tolist() == (pixels * 0.5 + 1.0).tolist()
    top = np.zeros((4, 6), dtype=bool)
    top[:2] = True
    masks = RoiMasks({"top": top, "bottom": ~top})
    # Stored values 0 to 33 (rows 0-1) and 36 to 69 (rows 2-3), times 0.5, plus 1.
    assert masks.roi_means(volumes[0].data).tolist() == [9.25, 27.25]


def test_dicom_tr_from_name_pattern(tmp_path):
    pixels = np.ones((2, 2), dtype=np.int16)
    write_dicom_volume(tmp_path / "run1_007.dcm", pixels, instance_number=99)
    watcher = VolumeWatcher(tmp_path, "run1_{tr:03d}.dcm", first_number=1, settle_s=0.0)

    assert [volume.tr_index for volume in watcher.poll(now=0.0)] == [6]


def test_dicom_without_instance_number_pending(tmp_path):
    raw = encode_dicom(np.ones((2, 2), dtype=np.uint16), instance_number=1)
    dataset = pydicom.dcmread(io.BytesIO(raw))
    del dataset.InstanceNumber
    dataset.save_as(tmp_path / "a.dcm")
    watcher = VolumeWatcher(tmp_path, "*.dcm", settle_s=0.0)

    assert watcher.poll(now=0.0) == []
    assert "no InstanceNumber" in watcher.pending["a.dcm"]


@pytest.mark.skipif(not SIEMENS_MOSAIC.exists(), reason="this nibabel install has no DICOM test data")
def test_siemens_mosaic_read_as_3d(tmp_path):
    raw = gzip.decompress(SIEMENS_MOSAIC.read_bytes())
    path = tmp_path / "mosaic.dcm"
    watcher = VolumeWatcher(tmp_path, "*.dcm", settle_s=0.0)

    path.write_bytes(raw[: len(raw) - 1000])
    assert watcher.poll(now=0.0) == []
    path.write_bytes(raw)
    volumes = watcher.poll(now=1.0)
    assert [volume.tr_index for volume in volumes] == [1]
    assert volumes[0].data.shape == (128, 128, 48)


# TR indices


def test_tr_index_from_name_pattern(tmp_path):
    data = volume_data(0)
    names = ["run1_vol_0001.nii", "run1_vol_0010.nii", "run1_vol_1.nii", "run1_vol_00010.nii",
             "run1_vol_0002.nii.tmp", "other.nii", "run1_vol_0000.nii"]
    for name in names:
        write_volume(tmp_path / name, data, AFFINE)
    watcher = nifti_watcher(tmp_path, "run1_vol_{tr:04d}.nii", first_number=1)

    volumes = watcher.poll(now=0.0)
    assert [volume.path.name for volume in volumes] == ["run1_vol_0001.nii", "run1_vol_0010.nii"]
    assert [volume.tr_index for volume in volumes] == [0, 9]
    # "run1_vol_0000.nii" matches but is numbered below first_number.
    assert list(watcher.pending) == ["run1_vol_0000.nii"]
    assert "negative" in watcher.pending["run1_vol_0000.nii"]


def test_tr_index_order_and_late_volume(tmp_path):
    watcher = nifti_watcher(tmp_path)
    for tr_index in (2, 0, 1):
        write_volume(tmp_path / f"vol_{tr_index:04d}.nii", volume_data(tr_index), AFFINE)
    assert [volume.tr_index for volume in watcher.poll(now=0.0)] == [0, 1, 2]

    write_volume(tmp_path / "vol_0004.nii", volume_data(4), AFFINE)
    assert [volume.tr_index for volume in watcher.poll(now=1.0)] == [4]
    write_volume(tmp_path / "vol_0003.nii", volume_data(3), AFFINE)
    late = watcher.poll(now=2.0)
    assert [volume.tr_index for volume in late] == [3]
    assert half_masks().roi_means(late[0].data).tolist() == expected_means(3)


def test_repeated_tr_index_skipped(tmp_path, caplog):
    write_volume(tmp_path / "a_03.nii", volume_data(3), AFFINE)
    write_volume(tmp_path / "b_03.nii", volume_data(9), AFFINE)
    watcher = nifti_watcher(tmp_path, "*_{tr:02d}.nii")

    with caplog.at_level(logging.WARNING, logger="acquisition.volumes"):
        volumes = watcher.poll(now=0.0)
    assert [volume.path.name for volume in volumes] == ["a_03.nii"]
    assert "b_03.nii is skipped because its TR index 3" in caplog.text


@pytest.mark.parametrize("pattern, name, number", [
    ("vol_{tr:04d}.nii", "vol_0012.nii", 12),
    ("vol_{tr:04d}.nii", "vol_12345.nii", 12345),
    ("vol_{tr:04d}.nii", "vol_012.nii", None),
    ("vol_{tr}.nii", "vol_12.nii", 12),
    ("vol_{tr}.nii", "vol_012.nii", None),
    ("*_{tr:03d}.dcm", "001_000013_005.dcm", 5),
    ("vol_{tr:d}.nii", "vol_x.nii", None),
])
def test_file_pattern_numbers(pattern, name, number):
    matched, found = FilePattern(pattern).match(name)
    assert matched is (number is not None)
    assert found == number


@pytest.mark.parametrize("pattern, message", [
    ("vol_{tr:x}.nii", "brace outside a TR field"),
    ("vol_{tr:4d}.nii", "spaces"),
    ("{tr}_{tr}.nii", "2 TR fields"),
    ("sub/vol_{tr}.nii", "without a folder"),
])
def test_file_pattern_invalid(pattern, message):
    with pytest.raises(ValueError, match=message):
        FilePattern(pattern)


def test_nifti_pattern_needs_tr_field(tmp_path):
    with pytest.raises(ValueError, match="no TR field"):
        VolumeWatcher(tmp_path, "*.nii")


# ROI masks


def test_mask_file_shape_mismatch(tmp_path):
    mask = np.zeros((4, 5, 2), dtype=np.uint8)
    mask[0] = 1
    nibabel.save(nibabel.Nifti1Image(mask, AFFINE), tmp_path / "ffa_left.nii.gz")
    masks = RoiMasks.from_files({"ffa_left": tmp_path / "ffa_left.nii.gz"})

    with pytest.raises(MaskShapeError) as caught:
        masks.roi_means(volume_data(0), source="volume file vol_0000.nii")
    message = str(caught.value)
    assert "ffa_left.nii.gz" in message
    assert "(4, 5, 2)" in message
    assert "(4, 5, 3)" in message
    assert "vol_0000.nii" in message


def test_masks_with_different_shapes(tmp_path):
    for name, shape in (("a", (4, 5, 3)), ("b", (4, 5, 2))):
        nibabel.save(nibabel.Nifti1Image(np.ones(shape, dtype=np.uint8), AFFINE), tmp_path / f"{name}.nii")

    with pytest.raises(MaskShapeError, match=r"a\.nii.*b\.nii|b\.nii.*a\.nii"):
        RoiMasks.from_files({"a": tmp_path / "a.nii", "b": tmp_path / "b.nii"})


def test_empty_mask_rejected():
    with pytest.raises(ValueError, match="'empty' .*selects no voxel"):
        RoiMasks({"full": np.ones(SHAPE), "empty": np.full(SHAPE, np.nan)})


def test_label_file_masks(tmp_path):
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[:2] = 7
    labels[2:] = 9
    nibabel.save(nibabel.Nifti1Image(labels, AFFINE), tmp_path / "atlas.nii.gz")
    masks = RoiMasks.from_label_file(tmp_path / "atlas.nii.gz", {"left": 7, "right": 9})

    assert masks.names == ROIS
    assert masks.roi_means(volume_data(1)).tolist() == expected_means(1)
    with pytest.raises(ValueError, match="atlas.nii.gz label 3"):
        RoiMasks.from_label_file(tmp_path / "atlas.nii.gz", {"left": 7, "missing": 3})


def test_mask_trailing_axis_dropped():
    left = np.zeros(SHAPE + (1,), dtype=np.uint8)
    left[:2] = 1
    masks = RoiMasks({"left": left})

    assert masks.shape == SHAPE
    assert masks.roi_means(volume_data(0)[..., np.newaxis]).tolist() == [14.5]


# Bridge over ZeroMQ


def test_bridge_sends_tr_order_and_late_volume(tmp_path, publisher_subscriber):
    publisher, subscriber = publisher_subscriber
    bridge = VolumeBridge(nifti_watcher(tmp_path), half_masks(), publisher)
    for tr_index in (1, 0, 2):
        write_volume(tmp_path / f"vol_{tr_index:04d}.nii", volume_data(tr_index), AFFINE)
    bridge.poll(now=0.0)
    write_volume(tmp_path / "vol_0004.nii", volume_data(4), AFFINE)
    bridge.poll(now=1.0)
    write_volume(tmp_path / "vol_0003.nii", volume_data(3), AFFINE)
    bridge.poll(now=2.0)

    messages = receive(subscriber, 5)
    assert [message.tr_index for message in messages] == [0, 1, 2, 4, 3]
    assert [message.sequence for message in messages] == [0, 1, 2, 3, 4]
    for message in messages:
        assert list(message.roi_values) == expected_means(message.tr_index)
        assert message.roi_names == ROIS
    mtime = (tmp_path / "vol_0003.nii").stat().st_mtime_ns / 1e9
    assert messages[-1].acquisition_time == mtime


def test_bridge_with_writer_in_parts(tmp_path, publisher_subscriber):
    publisher, subscriber = publisher_subscriber
    bridge = VolumeBridge(nifti_watcher(tmp_path, "vol_{tr:04d}.nii.gz", settle_s=0.02), half_masks(),
                          publisher)
    order = [0, 1, 2, 4, 3]
    errors: list[BaseException] = []

    def write_run() -> None:
        try:
            for tr_index in order:
                write_volume(tmp_path / f"vol_{tr_index:04d}.nii.gz", volume_data(tr_index), AFFINE,
                             n_parts=3, pause_s=0.01)
        except BaseException as err:  # asserted on in the test's own thread below
            errors.append(err)

    writer = threading.Thread(target=write_run)
    writer.start()
    messages = receive(subscriber, len(order), poll=lambda: bridge.poll(time.monotonic()))
    writer.join(timeout=WAIT_S)

    assert errors == []
    assert sorted(message.tr_index for message in messages) == sorted(order)
    for message in messages:
        assert list(message.roi_values) == expected_means(message.tr_index)
    assert subscriber.n_missing == 0


def test_bridge_run_until_all_trs(tmp_path, publisher_subscriber):
    publisher, subscriber = publisher_subscriber
    for tr_index in range(3):
        write_volume(tmp_path / f"vol_{tr_index:04d}.nii", volume_data(tr_index), AFFINE)
    bridge = VolumeBridge(nifti_watcher(tmp_path), half_masks(), publisher)

    assert bridge.run(n_trs=3, timeout_s=WAIT_S, poll_interval_s=0.01)
    assert [message.tr_index for message in receive(subscriber, 3)] == [0, 1, 2]
    assert not bridge.run(n_trs=4, timeout_s=0.05, poll_interval_s=0.01)


def test_bridge_nan_roi_sent_as_null(tmp_path, publisher_subscriber):
    publisher, subscriber = publisher_subscriber
    data = volume_data(0).astype(np.float32)
    data[3, 0, 0] = np.nan
    write_volume(tmp_path / "vol_0000.nii", data, AFFINE)
    bridge = VolumeBridge(nifti_watcher(tmp_path), half_masks(), publisher)
    bridge.poll(now=0.0)

    (message,) = receive(subscriber, 1)
    assert message.roi_values == (14.5, None)


def test_bridge_mask_mismatch_raises(tmp_path, publisher_subscriber):
    publisher, _ = publisher_subscriber
    write_volume(tmp_path / "vol_0000.nii", np.zeros((4, 5, 2), dtype=np.int16), AFFINE)
    bridge = VolumeBridge(nifti_watcher(tmp_path), half_masks(), publisher)

    with pytest.raises(MaskShapeError, match="vol_0000.nii has shape"):
        bridge.poll(now=0.0)
    assert publisher.n_sent == 0


def test_write_in_parts_same_bytes(tmp_path):
    raw = bytes(range(256)) * 3
    path = write_in_parts(tmp_path / "parts.bin", raw, n_parts=7)

    assert path.read_bytes() == raw


# The neurosteer bridge command


def test_bridge_command_publishes_folder(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    left = np.zeros(SHAPE, dtype=np.uint8)
    left[:2] = 1
    write_volume(tmp_path / "left.nii", left, np.eye(4))
    write_volume(tmp_path / "right.nii", 1 - left, np.eye(4))
    folder = tmp_path / "volumes"
    folder.mkdir()

    command = [sys.executable, "-m", "loop.cli", "bridge", str(folder), "--pattern",
               "vol_{tr:04d}.nii", "--mask", f"left={tmp_path / 'left.nii'}", "--mask",
               f"right={tmp_path / 'right.nii'}", "--address", address, "--n-trs", "2"]
    bridge = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    subscriber = TRSubscriber(address, roi_names=ROIS)
    try:
        for tr_index in (1, 0):
            write_volume(folder / f"vol_{tr_index:04d}.nii", volume_data(tr_index), np.eye(4))
        messages = receive(subscriber, 2)
        assert bridge.wait(timeout=WAIT_S) == 0
    finally:
        subscriber.close()
        if bridge.poll() is None:
            bridge.kill()
    output = bridge.stdout.read().decode()
    assert [message.tr_index for message in messages] == [0, 1], output
    for message in messages:
        assert list(message.roi_values) == expected_means(message.tr_index)
        assert message.roi_names == ("left", "right")
