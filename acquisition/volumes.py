"""Per-TR ROI means from volume files in a folder, for labs with no real-time fMRI pipeline.

``VolumeBridge`` runs in its own process on a machine that can read the scanner's export folder. It
polls the folder with ``VolumeWatcher``, reads each NIfTI or DICOM volume once it is completely
written, averages it inside ``RoiMasks`` and sends one message per TR to the controller through a
``TRPublisher`` (schema in ``acquisition/zmq_bridge.py``). ``write_volume`` and
``write_dicom_volume`` write volumes the same way a scanner does, for the simulated scanner and
the tests. Main limit: each poll lists the whole folder, and each volume is read whole into memory.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import os
import re
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel
import numpy as np
import pydicom
from nibabel.spatialimages import HeaderDataError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from acquisition.zmq_bridge import TRMessage, TRPublisher

logger = logging.getLogger(__name__)

VolumeFormat = Literal["nifti", "dicom"]

# The image class for each value of sizeof_hdr, the first field of a NIfTI header.
NIFTI_CLASSES = {348: nibabel.Nifti1Image, 540: nibabel.Nifti2Image}
GZIP_MAGIC = b"\x1f\x8b"
# Linux stamps mtime from a coarse clock whose tick is at most 10 ms (one jiffy at HZ=100), so a
# settle time above that detects a write that lands after the first look. FAT (2 s) and some network
# mounts stamp far more coarsely and need a longer settle time.
DEFAULT_SETTLE_S = 0.1
DEFAULT_STALL_WARNING_S = 10.0
# Affines further apart than this (in mm, element by element) put a mask on another grid.
AFFINE_TOLERANCE_MM = 1e-3

# {tr}, {tr:d} or {tr:0Nd}, the only fields a file name pattern may contain.
TR_FIELD = re.compile(r"\{tr(?::(?P<spec>0?\d*d))?\}")


class MaskShapeError(ValueError):
    """ROI masks whose shape differs from a volume's, or from each other's."""


class _NotReady(Exception):
    """A file that is not (yet) a complete, usable volume. The message is the reason."""


# File names


class FilePattern:
    """A file name pattern with ``*`` for any characters and at most one TR number field.

    The field is ``{tr}``, ``{tr:d}`` or ``{tr:0Nd}`` (zero-padded to N digits), as in
    ``vol_{tr:04d}.nii``. A name matches only if formatting its number with the field gives back the
    same digits, so ``vol_12.nii`` does not match ``vol_{tr:04d}.nii``.
    """

    def __init__(self, pattern: str) -> None:
        if not pattern or "/" in pattern or os.sep in pattern:
            raise ValueError(f"File name pattern {pattern!r} is invalid. Give a file name such as "
                             "'vol_{tr:04d}.nii', without a folder.")
        fields = list(TR_FIELD.finditer(pattern))
        if len(fields) > 1:
            raise ValueError(f"File name pattern {pattern!r} has {len(fields)} TR fields, but only one is "
                             "allowed.")

        literals = TR_FIELD.split(pattern)[::2] if fields else [pattern]
        for literal in literals:
            if "{" in literal or "}" in literal:
                raise ValueError(
                    f"File name pattern {pattern!r} has a brace outside a TR field. The TR field is "
                    "{tr}, {tr:d} or {tr:0Nd}.")
        self.pattern = pattern
        self.spec = None
        if fields:
            spec = fields[0].group("spec") or "d"
            if spec[0] != "0" and spec != "d":
                raise ValueError(f"File name pattern {pattern!r} pads the TR number with spaces. "
                                 "Use {tr:0Nd} for zero padding or {tr} for none.")
            self.spec = spec
        parts = [_literal_regex(literal) for literal in literals]
        self._regex = re.compile("(?P<tr>[0-9]+)".join(parts), re.DOTALL)

    @property
    def has_tr_field(self) -> bool:
        return self.spec is not None

    def match(self, name: str) -> tuple[bool, int | None]:
        """Return whether ``name`` matches and the number in its TR field (None without a field)."""
        found = self._regex.fullmatch(name)
        if found is None:
            return False, None
        if self.spec is None:
            return True, None
        digits = found.group("tr")
        number = int(digits)
        if format(number, self.spec) != digits:
            return False, None
        return True, number


def _literal_regex(literal: str) -> str:
    return ".*".join(re.escape(piece) for piece in literal.split("*"))


def _infer_format(pattern: str) -> VolumeFormat:
    lowered = pattern.lower()
    if lowered.endswith((".nii", ".nii.gz")):
        return "nifti"
    if lowered.endswith((".dcm", ".ima")):
        return "dicom"
    raise ValueError(f"The volume format is unknown for the file name pattern {pattern!r}. "
                     "Pass volume_format='nifti' or 'dicom'.")


# Reading one file


@dataclass(frozen=True, eq=False)
class Volume:
    """One complete volume as found in the folder.

    ``data`` is float64 with scaling applied: NIfTI in nibabel's (i, j, k) order, DICOM in the
    order of nibabel's DICOM wrapper (rows, columns, then slices for a Siemens mosaic). Axes of
    length 1 after the third are dropped. ``affine`` is the NIfTI voxel-to-world affine, None for
    DICOM. ``modified_time`` is the file's mtime in POSIX seconds, which the bridge sends as the
    acquisition time.
    """

    path: Path
    tr_index: int
    data: np.ndarray
    affine: np.ndarray | None
    modified_time: float


def decode_nifti(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Decode a whole single-file NIfTI-1 or NIfTI-2 volume (``.nii`` or ``.nii.gz``) from bytes.

    Returns ``(data, affine)``. Raises ``_NotReady`` if the bytes are not a complete volume: a
    gzip stream without its end marker or with a bad CRC, or fewer bytes than vox_offset plus the
    data size that the header implies.
    """
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except EOFError as err:
            raise _NotReady(f"the gzip stream has no end marker yet ({err})") from err
        except (gzip.BadGzipFile, zlib.error) as err:
            raise _NotReady(f"the gzip stream is invalid: {err}") from err

    if len(raw) < 4:
        raise _NotReady(f"the NIfTI header is incomplete ({len(raw)} bytes)")
    header_sizes = [int.from_bytes(raw[:4], order) for order in ("little", "big")]
    image_class = next((NIFTI_CLASSES[size] for size in header_sizes if size in NIFTI_CLASSES), None)
    if image_class is None:
        raise _NotReady("the file does not start with a NIfTI-1 or NIfTI-2 header")
    header_size = image_class.header_class.sizeof_hdr
    if len(raw) < header_size:
        raise _NotReady(f"the NIfTI header is incomplete ({len(raw)} of {header_size} bytes)")
    try:
        header = image_class.header_class(raw[:header_size])
    except HeaderDataError as err:
        raise _NotReady(f"the NIfTI header is invalid: {err}") from err

    shape = header.get_data_shape()
    expected_size = int(header.get_data_offset()) + math.prod(shape) * header.get_data_dtype().itemsize
    if len(raw) < expected_size:
        raise _NotReady(f"{len(raw)} of the {expected_size} bytes that the header implies are written")
    image = image_class.from_bytes(raw)
    return image.get_fdata(dtype=np.float64), image.affine


def decode_dicom(raw: bytes) -> tuple[np.ndarray, int | None]:
    """Decode a whole DICOM volume with native (uncompressed) pixel data from bytes.

    Returns ``(data, instance_number)``, the number None if the file has none. A Siemens mosaic
    becomes a 3D volume. Raises ``_NotReady`` if the file cannot be read yet or its pixel data is
    shorter than Rows x Columns x SamplesPerPixel x NumberOfFrames x BitsAllocated implies.
    pydicom itself reads a file cut inside the pixel data without an error (pydicom 3.0.2, tested).
    """
    dataset = pydicom.dcmread(io.BytesIO(raw))
    transfer_syntax = dataset.file_meta.get("TransferSyntaxUID")
    if transfer_syntax is not None and transfer_syntax.is_compressed:
        raise _NotReady(f"the pixel data is compressed ({transfer_syntax.name}), and only native pixel "
                        "data has a size that shows the file is complete")
    pixel_data = dataset.get("PixelData")
    if pixel_data is None:
        raise _NotReady("the pixel data is not written yet")
    n_bits = (int(dataset.Rows) * int(dataset.Columns) * int(dataset.get("SamplesPerPixel", 1))
              * int(dataset.get("NumberOfFrames", 1) or 1) * int(dataset.BitsAllocated))
    expected_size = (n_bits + 7) // 8
    if len(pixel_data) < expected_size:
        raise _NotReady(f"{len(pixel_data)} of the {expected_size} bytes of pixel data are written")

    dicom_wrapper = _dicom_wrapper_module()
    data = dicom_wrapper.wrapper_from_data(dataset).get_data()
    instance_number = dataset.get("InstanceNumber")
    return np.asarray(data, dtype=np.float64), None if instance_number is None else int(instance_number)


def _dicom_wrapper_module():
    # nibabel (5.4.2) warns at the import of its DICOM readers that they are experimental. They are
    # used here for the Rows/Columns order, the rescaling and Siemens mosaics.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import dicomwrappers
    return dicomwrappers


def _as_volume_array(data: np.ndarray) -> np.ndarray:
    """Drop axes of length 1 after the third; raise ``_NotReady`` for a series or an empty image."""
    volume = _drop_trailing_singletons(data)
    if volume.ndim > 3:
        raise _NotReady(f"it has shape {data.shape}, so it contains more than one volume")
    if volume.size == 0:
        raise _NotReady(f"it has shape {data.shape}, with no voxels")
    return volume


# Watching a folder


@dataclass
class _FileState:
    """The watcher's record of one file that it has not returned yet."""

    signature: tuple[int, int, int]
    since: float
    checked: bool = False
    reason: str = "not read yet"
    warned: bool = False


class VolumeWatcher:
    """Find the volume files that appear in ``folder`` and return each once it is completely written.

    Call :meth:`poll` with the current time, in seconds on any monotonic clock, as often as the
    latency needs. A file is returned once, when both rules hold:

    - Its content is complete. For NIfTI the header is readable, a gzip stream has its end marker
      and a valid CRC, and the file contains at least vox_offset plus the data size that the header
      implies (bytes after that are ignored). For DICOM pydicom reads it and the pixel data has the
      size that Rows, Columns and BitsAllocated imply. The content must also be one volume (a 4D
      file with several volumes never qualifies).
    - Its size, mtime and inode have been the same at polls at least ``settle_s`` apart. This
      catches a writer that preallocates the file or rewrites it in place, which the size alone
      cannot. ``settle_s=0`` turns the rule off and returns a file at the first poll that finds it
      complete.

    A file is read only when the rules above could pass, so a file that stays incomplete is read
    once per change. A file that fails either rule, or whose TR index cannot be found, stays in
    :attr:`pending` for later polls, and :meth:`poll` does not raise for it. One that has not changed
    for ``stall_warning_s`` while still not a usable volume is logged once at WARNING with the reason.

    TR index: with a TR field in ``pattern`` it is the number in the name minus ``first_number``
    (default 0). Without one it is the DICOM InstanceNumber minus ``first_number`` (default 1,
    because scanners number the first volume 1). A number below ``first_number`` leaves the file
    pending. A second file with a TR index already returned is logged at WARNING and skipped. Files present
    at the first poll are returned like new ones, so start each run with an empty folder. Write
    a file under another name and rename it into place (the pattern must not match the temporary
    name) when the writer can.
    """

    def __init__(self, folder: str | Path, pattern: str, *, volume_format: VolumeFormat | None = None,
                 first_number: int | None = None, settle_s: float = DEFAULT_SETTLE_S,
                 stall_warning_s: float = DEFAULT_STALL_WARNING_S) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"Volume folder {str(self.folder)!r} is not found or not a folder.")
        self.pattern = FilePattern(pattern)
        self.volume_format = volume_format or _infer_format(pattern)
        if self.volume_format not in ("nifti", "dicom"):
            raise ValueError(f"volume_format must be 'nifti' or 'dicom', got {volume_format!r}.")
        if not self.pattern.has_tr_field and self.volume_format == "nifti":
            raise ValueError(f"File name pattern {pattern!r} has no TR field such as {{tr:04d}}, and NIfTI "
                             "volumes carry no index of their own, so the TR index cannot be known.")
        if not settle_s >= 0 or not stall_warning_s >= 0:
            raise ValueError(f"settle_s and stall_warning_s must be 0 or more, got {settle_s} and "
                             f"{stall_warning_s}.")
        self.first_number = first_number if first_number is not None else (
            0 if self.pattern.has_tr_field else 1)
        self.settle_s = settle_s
        self.stall_warning_s = stall_warning_s
        self._pending: dict[str, _FileState] = {}
        self._done: set[str] = set()
        self._tr_files: dict[int, str] = {}

    @property
    def pending(self) -> dict[str, str]:
        """Names of the matching files not returned yet, each with the reason it is not."""
        return {name: state.reason for name, state in sorted(self._pending.items())}

    def poll(self, now: float) -> list[Volume]:
        """Return the volumes that became complete since the last poll, sorted by TR index."""
        volumes = []
        for entry in self._list_new_files():
            volume = self._check(entry, now)
            if volume is not None:
                volumes.append(volume)
        volumes.sort(key=lambda volume: volume.tr_index)
        return volumes

    def _list_new_files(self) -> list[os.DirEntry]:
        with os.scandir(self.folder) as entries:
            new_files = [entry for entry in entries if entry.name not in self._done
                         and self.pattern.match(entry.name)[0] and entry.is_file()]
        listed = {entry.name for entry in new_files}
        for name in [name for name in self._pending if name not in listed]:
            self._forget(name)
        return sorted(new_files, key=lambda entry: entry.name)

    def _forget(self, name: str) -> None:
        if self._pending.pop(name, None) is not None:
            logger.warning("Volume file %s disappeared before it was complete.", name)

    def _check(self, entry: os.DirEntry, now: float) -> Volume | None:
        """Apply both completeness rules to one file; return its volume once they pass."""
        # Step 1: has the file changed since the last poll?
        path = Path(entry.path)
        signature = _signature(path)
        if signature is None:
            self._forget(entry.name)
            return None
        state = self._pending.get(entry.name)
        if state is None or state.signature != signature:
            state = _FileState(signature, since=now)
            self._pending[entry.name] = state

        # Step 2: skip a file that has not settled, or that failed its check and has not changed since.
        if state.checked:
            self._warn_if_stalled(entry.name, state, now)
            return None
        if now - state.since < self.settle_s:
            state.reason = f"unchanged for {now - state.since:.3f} s of the {self.settle_s} s settle time"
            return None

        # Step 3: read and decode it, and make sure it did not change while it was read.
        try:
            raw = path.read_bytes()
            tr_index, data, affine = self._decode(entry.name, raw)
        except FileNotFoundError:
            self._forget(entry.name)
            return None
        except (_NotReady, OSError) as err:
            return self._not_ready(entry.name, state, str(err), now)
        except Exception as err:  # noqa: BLE001
            # pydicom and nibabel raise many exception types for a cut-off file (EOFError,
            # struct.error, KeyError, ValueError, ...), so any error means "not complete yet".
            return self._not_ready(entry.name, state, f"{type(err).__name__}: {err}", now)
        if _signature(path) != signature:
            state.reason = "changed while it was read"
            return None
        return self._accept(entry.name, path, tr_index, data, affine, signature)

    def _decode(self, name: str, raw: bytes) -> tuple[int, np.ndarray, np.ndarray | None]:
        affine = None
        if self.volume_format == "nifti":
            data, affine = decode_nifti(raw)
            instance_number = None
        else:
            data, instance_number = decode_dicom(raw)
        data = _as_volume_array(data)

        number = self.pattern.match(name)[1] if self.pattern.has_tr_field else instance_number
        if number is None:
            raise _NotReady("the DICOM file has no InstanceNumber, and the file name pattern has no TR field")
        if number < self.first_number:
            raise _NotReady(f"its number {number} is below first_number {self.first_number}, so its "
                            "TR index would be negative")
        return number - self.first_number, data, affine

    def _not_ready(self, name: str, state: _FileState, reason: str, now: float) -> None:
        state.checked = True
        state.reason = reason
        logger.debug("Volume file %s is not complete: %s.", name, reason)
        self._warn_if_stalled(name, state, now)
        return None

    def _warn_if_stalled(self, name: str, state: _FileState, now: float) -> None:
        if not state.warned and now - state.since >= self.stall_warning_s:
            state.warned = True
            logger.warning("Volume file %s has not changed for %.1f s and is not a usable volume: %s.",
                           name, now - state.since, state.reason)

    def _accept(self, name: str, path: Path, tr_index: int, data: np.ndarray, affine: np.ndarray | None,
                signature: tuple[int, int, int]) -> Volume | None:
        del self._pending[name]
        self._done.add(name)
        earlier = self._tr_files.get(tr_index)
        if earlier is not None:
            logger.warning("Volume file %s is skipped because its TR index %d is the same as that of %s.",
                           name, tr_index, earlier)
            return None
        self._tr_files[tr_index] = name
        return Volume(path, tr_index, data, affine, modified_time=signature[1] / 1e9)


def _signature(path: Path) -> tuple[int, int, int] | None:
    """Return the file's (size, mtime_ns, inode), or None if it is gone."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


# ROI masks


class RoiMasks:
    """One boolean mask per ROI, all on the grid of the functional volumes.

    A voxel is in an ROI where its mask value is nonzero and not NaN. ``sources`` name where each
    mask came from (a file name, or "array"), for error messages. ``affine`` is the masks' NIfTI
    affine when they came from files.
    """

    def __init__(self, masks: Mapping[str, np.ndarray], *, sources: Mapping[str, str] | None = None,
                 affine: np.ndarray | None = None) -> None:
        if not masks:
            raise ValueError("RoiMasks needs at least one ROI mask.")
        self.names = tuple(masks)
        self.sources = {name: (sources or {}).get(name, "array") for name in self.names}
        for name in self.names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"ROI names must be non-empty strings, got {name!r}.")

        arrays = {}
        for name, mask in masks.items():
            values = np.asarray(mask)
            arrays[name] = _drop_trailing_singletons((values != 0) & ~np.isnan(values.astype(np.float64)))
        first = self.names[0]
        self.shape = arrays[first].shape
        for name, mask in arrays.items():
            if mask.shape != self.shape:
                raise MaskShapeError(
                    f"ROI mask {self._describe(name)} has shape {mask.shape}, but ROI mask "
                    f"{self._describe(first)} has shape {self.shape}. All masks must be on one grid.")
            if not mask.any():
                raise ValueError(f"ROI mask {self._describe(name)} selects no voxel. Check the mask "
                                 "file or the label value.")
        self.affine = affine
        self._indices = [np.flatnonzero(arrays[name]) for name in self.names]
        self._affine_warned = False

    @classmethod
    def from_files(cls, paths: Mapping[str, str | Path]) -> RoiMasks:
        """Load one NIfTI mask file per ROI, as ``{roi_name: path}``. All files must have one affine."""
        masks, sources = {}, {}
        first_path, affine = None, None
        for name, path in paths.items():
            image = nibabel.load(path)
            masks[name] = np.asanyarray(image.dataobj)
            sources[name] = Path(path).name
            if affine is None:
                first_path, affine = path, image.affine
            elif not np.allclose(image.affine, affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
                raise MaskShapeError(
                    f"Mask file {path} has affine {image.affine.tolist()}, but mask file {first_path} has "
                    f"{affine.tolist()}. All masks must be on one grid.")
        return cls(masks, sources=sources, affine=affine)

    @classmethod
    def from_label_file(cls, path: str | Path, labels: Mapping[str, int]) -> RoiMasks:
        """Load ROIs from one NIfTI label image (an atlas), as ``{roi_name: label_value}``."""
        image = nibabel.load(path)
        values = np.asanyarray(image.dataobj)
        source = Path(path).name
        masks = {name: values == label for name, label in labels.items()}
        return cls(masks, sources={name: f"{source} label {label}" for name, label in labels.items()},
                   affine=image.affine)

    @property
    def n_rois(self) -> int:
        return len(self.names)

    def roi_means(self, volume: np.ndarray, source: str = "the volume") -> np.ndarray:
        """Return the ``(n_rois,)`` mean of ``volume`` over each ROI, NaN where the ROI has a NaN voxel.

        Raises MaskShapeError, naming the mask source, ``source`` and both shapes, if the volume
        is not on the masks' grid.
        """
        data = _drop_trailing_singletons(np.asarray(volume, dtype=np.float64))
        if data.shape != self.shape:
            raise MaskShapeError(
                f"ROI mask {self._describe(self.names[0])} has shape {self.shape}, but {source} has shape "
                f"{data.shape}. Resample the masks to the grid of the functional volumes.")
        flat = data.ravel()
        return np.array([flat[indices].mean() for indices in self._indices])

    def check_affine(self, affine: np.ndarray | None, source: str) -> None:
        """Log a WARNING, once, if a volume's affine differs from the masks' (same shape, other grid)."""
        if affine is None or self.affine is None or self._affine_warned:
            return
        if not np.allclose(affine, self.affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
            self._affine_warned = True
            logger.warning("Volume %s has affine %s, but the ROI masks have %s, so the ROI means may come "
                           "from the wrong voxels.", source, affine.tolist(), self.affine.tolist())

    def _describe(self, name: str) -> str:
        return f"{name!r} ({self.sources[name]})"


def _drop_trailing_singletons(data: np.ndarray) -> np.ndarray:
    shape = data.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return data.reshape(shape)


# Bridge


class VolumeBridge:
    """Send the ROI means of each complete volume in a folder as one TR message.

    Call ``publisher.wait_for_subscribers()`` before the first poll, because messages sent before a
    subscriber joins are lost. Each poll sends the volumes that became complete, in TR order. A
    volume that completes after a later TR was sent is sent then, under its own TR index. An ROI
    whose mean is NaN is sent as null. The acquisition time sent is the file's mtime in POSIX
    seconds: when the writer last wrote it, on the clock of the machine holding the folder.
    """

    # NOTE: DICOM AcquisitionTime is nearer the acquisition than the mtime, but it is a local time of
    # day with no time zone, so it is not used. The mtime lags it by the reconstruction and export delay.

    def __init__(self, watcher: VolumeWatcher, masks: RoiMasks, publisher: TRPublisher, *,
                 send_roi_names: bool = True) -> None:
        self.watcher = watcher
        self.masks = masks
        self.publisher = publisher
        self.send_roi_names = send_roi_names
        self.sent_tr_indices: list[int] = []

    def poll(self, now: float) -> list[TRMessage]:
        """Send the volumes completed since the last poll; return the messages sent.

        Raises MaskShapeError if a volume is not on the masks' grid, since every later volume of
        the run would fail the same way.
        """
        messages = []
        for volume in self.watcher.poll(now):
            source = f"volume file {volume.path.name}"
            self.masks.check_affine(volume.affine, source)
            means = self.masks.roi_means(volume.data, source)
            values = [None if math.isnan(mean) else float(mean) for mean in means]
            roi_names = self.masks.names if self.send_roi_names else None
            messages.append(self.publisher.send(volume.tr_index, volume.modified_time, values, roi_names))
            self.sent_tr_indices.append(volume.tr_index)
            logger.debug("Sent TR %d from %s.", volume.tr_index, volume.path.name)
        return messages

    def run(self, *, n_trs: int | None = None, stop: threading.Event | None = None,
            timeout_s: float | None = None, poll_interval_s: float = 0.05,
            clock: Callable[[], float] = time.monotonic) -> bool:
        """Poll every ``poll_interval_s`` until the TRs are sent, ``stop`` is set or ``timeout_s`` passes.

        Returns True if TRs 0 to ``n_trs`` - 1 were all sent (always True without ``n_trs``). Without
        ``n_trs``, ``stop`` or ``timeout_s`` it runs until interrupted. ``clock`` gives the ``now``
        passed to :meth:`poll`.
        """
        if not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s}.")
        stop = stop or threading.Event()
        deadline = math.inf if timeout_s is None else clock() + timeout_s
        expected_trs = set(range(n_trs)) if n_trs is not None else None
        logger.info("Volume bridge watching %s for %s, sending to %s.", self.watcher.folder,
                    self.watcher.pattern.pattern, self.publisher.address)
        while True:
            self.poll(clock())
            if expected_trs is not None and expected_trs.issubset(self.sent_tr_indices):
                logger.info("Volume bridge sent all %d TRs.", n_trs)
                return True
            if clock() >= deadline:
                missing = sorted(expected_trs - set(self.sent_tr_indices)) if expected_trs is not None else []
                logger.warning("Volume bridge timed out after %.1f s with TRs %s not sent. Files still "
                               "pending: %s.", timeout_s, missing[:20], self.watcher.pending)
                return False
            if stop.wait(poll_interval_s):
                return expected_trs is None or expected_trs.issubset(self.sent_tr_indices)


# Writing volumes


def encode_nifti(data: np.ndarray, affine: np.ndarray, *, compress: bool = False) -> bytes:
    """Return ``data`` as the bytes of a single-file NIfTI-1 volume, gzip-compressed if ``compress``."""
    raw = nibabel.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64)).to_bytes()
    # mtime=0 makes the same volume give the same bytes.
    return gzip.compress(raw, mtime=0) if compress else raw


def encode_dicom(data: np.ndarray, instance_number: int, *, rescale_slope: float = 1.0,
                 rescale_intercept: float = 0.0) -> bytes:
    """Return a 2D ``(rows, columns)`` uint16 or int16 image as the bytes of a single-frame MR DICOM file.

    Stored values are ``data`` as given. Readers apply ``rescale_slope`` and ``rescale_intercept``.
    Writing a 3D volume as DICOM needs a Siemens mosaic or an enhanced multi-frame file, which this
    writer does not make.
    """
    pixels = np.asarray(data)
    if pixels.ndim != 2 or pixels.dtype not in (np.uint16, np.int16):
        raise ValueError(f"encode_dicom writes a 2D uint16 or int16 image, got shape {pixels.shape} and "
                         f"dtype {pixels.dtype}.")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = MRImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "MR"
    dataset.InstanceNumber = instance_number
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    dataset.RescaleSlope = rescale_slope
    dataset.RescaleIntercept = rescale_intercept
    dataset.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()

    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_volume(path: str | Path, data: np.ndarray, affine: np.ndarray, *, n_parts: int = 1,
                 pause_s: float = 0.0) -> Path:
    """Write a NIfTI volume in place as a scanner does, gzip-compressed if ``path`` ends in ``.gz``.

    With ``n_parts`` > 1 the bytes are written in that many flushed parts, ``pause_s`` apart, so a
    reader can find the file partly written.
    """
    path = Path(path)
    return write_in_parts(path, encode_nifti(data, affine, compress=path.suffix == ".gz"), n_parts, pause_s)


def write_dicom_volume(path: str | Path, data: np.ndarray, instance_number: int, *, n_parts: int = 1,
                       pause_s: float = 0.0, rescale_slope: float = 1.0,
                       rescale_intercept: float = 0.0) -> Path:
    """Write a 2D image as a DICOM file in place, in parts as :func:`write_volume` does."""
    raw = encode_dicom(data, instance_number, rescale_slope=rescale_slope,
                       rescale_intercept=rescale_intercept)
    return write_in_parts(Path(path), raw, n_parts, pause_s)


def write_in_parts(path: Path, raw: bytes, n_parts: int = 1, pause_s: float = 0.0) -> Path:
    """Write ``raw`` to ``path`` in ``n_parts`` nearly equal, flushed parts with ``pause_s`` between them."""
    if n_parts < 1 or pause_s < 0:
        raise ValueError(f"n_parts must be at least 1 and pause_s 0 or more, got {n_parts} and {pause_s}.")
    bounds = [len(raw) * part // n_parts for part in range(n_parts + 1)]
    with path.open("wb") as file:
        for part in range(n_parts):
            if part > 0 and pause_s > 0:
                time.sleep(pause_s)
            file.write(raw[bounds[part]:bounds[part + 1]])
            file.flush()
    return path
