"""Fixtures shared by the whole test suite.

Every test runs with the loopback-only LSL configuration and with the Hugging Face hub offline.
Tests marked ``display`` get a private Xvfb server through ``xvfb_display``.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from acquisition.lsl import configure_lsl

XVFB_START_TIMEOUT_S = 10.0
XVFB_STOP_TIMEOUT_S = 5.0
# "-nolisten tcp" keeps the server on its unix socket, off TCP port 6000 + N.
XVFB_ARGUMENTS = ("-screen", "0", "1280x1024x24", "+extension", "GLX", "-nolisten", "tcp")


@pytest.fixture(scope="session", autouse=True)
def loopback_lsl_offline_hub() -> Iterator[None]:
    """Keep LSL on this machine and the model hub offline for every test."""
    # liblsl reads its configuration once, at the first pylsl call, so this runs before any test.
    configure_lsl()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="session")
def xvfb_display(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start a private Xvfb server, set ``DISPLAY`` to it, and stop it after the session.

    Xvfb picks a free display number itself (``-displayfd``) and listens on a unix socket only.
    """
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.fail(
            "Xvfb is not installed, and the display tests need it. "
            "Install it with: apt-get install -y xvfb xauth",
            pytrace=False,
        )

    log_path = tmp_path_factory.mktemp("xvfb") / "xvfb.log"
    read_fd, write_fd = os.pipe()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [xvfb, "-displayfd", str(write_fd), *XVFB_ARGUMENTS],
            pass_fds=(write_fd,),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    os.close(write_fd)

    try:
        display = _read_display_number(read_fd, process, log_path)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("DISPLAY", display)
            yield display
    finally:
        os.close(read_fd)
        process.terminate()
        try:
            process.wait(timeout=XVFB_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _read_display_number(read_fd: int, process: subprocess.Popen, log_path: Path) -> str:
    """Return ``":N"`` once Xvfb writes its display number, which it does when ready for clients."""
    ready, _, _ = select.select([read_fd], [], [], XVFB_START_TIMEOUT_S)
    number = os.read(read_fd, 64).decode().strip() if ready else ""
    if not number:
        state = "still running" if process.poll() is None else f"exit status {process.returncode}"
        log = log_path.read_text(errors="replace")
        pytest.fail(
            f"Timed out after {XVFB_START_TIMEOUT_S:g} s waiting for Xvfb to report its display "
            f"number ({state}). Its output:\n{log}",
            pytrace=False,
        )
    return f":{number}"


@pytest.fixture(scope="session")
def gemma():
    """The embedded Gemma 3 270M in float32 (converted once into the neurosteer cache)."""
    from synth.models import load_causal_lm

    return load_causal_lm("embedded:gemma3-270m", device="cpu", dtype="float32")


@pytest.fixture
def unique_name(request) -> str:
    """A stream name no other test uses, so that no test resolves another test's stream."""
    return f"neurosteer-test-{request.node.name}-{os.getpid()}"[:120]


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Run torch on one thread for a module: the test machines are shared, and batches are small."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mobilenet():
    """The embedded MobileNetV2 on the CPU."""
    from synth.vision_models import load_vision_model

    return load_vision_model(device="cpu")
