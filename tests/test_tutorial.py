"""The tutorial (docs/tutorial.md) followed as a new user would: every ``sh`` block, in order.

The blocks run in one bash process, so that ``source`` and shell variables carry from block to
block, with ``set -euo pipefail``. They run in a temporary folder laid out like the repository
root: links to ``experiments``, ``hardware_configs``, ``tests/data``, ``Makefile`` and
``pyproject.toml``, so nothing is written into the checkout. A block whose first line is
``# expect exit code N`` runs in a subshell that must exit with N, and every line of the ``text``
block after it must appear in its output. Then the session file, the report and the exported files
are checked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import pytest

from loop.report import read_trials

pytestmark = pytest.mark.models

REPO = Path(__file__).resolve().parent.parent
TUTORIAL = REPO / "docs" / "tutorial.md"
LINKED = ("experiments", "hardware_configs", "tests/data", "Makefile", "pyproject.toml")
EXPECT_EXIT = re.compile(r"# expect exit code (\d+)")
FENCE = re.compile(r"^```(\S*)\s*$")
# The whole tutorial took 34 s on 2 cores with the model caches filled. A first run on a new
# machine also converts the embedded models, which takes minutes.
TIMEOUT_S = 900

# What the tutorial's experiment and rig files set.
TARGET_CHANNELS = [f"ECOG{number:03d}" for number in range(1, 9)]
NEW_CONDITION = "uncertain"
N_CALIBRATION = 12
CLOSED_LOOP_PER_CONDITION = 4  # 2 blocks x 2 trials
EVALUATION_PER_CONDITION = 2


@dataclass(frozen=True)
class Block:
    """A fenced code block of the tutorial."""

    line: int
    language: str
    code: str

    @property
    def expected_exit(self) -> int | None:
        first = self.code.splitlines()[0].strip() if self.code.strip() else ""
        match = EXPECT_EXIT.fullmatch(first)
        return int(match.group(1)) if match else None


def read_blocks(text: str) -> list[Block]:
    """Return the fenced code blocks of a Markdown text, in order."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line)
        if language is None and fence:
            language, start, lines = fence.group(1), number, []
        elif language is not None and line.strip() == "```":
            blocks.append(Block(start, language, "\n".join(lines)))
            language = None
        elif language is not None:
            lines.append(line)
    assert language is None, f"docs/tutorial.md: the code block at line {start} is never closed"
    return blocks


def expected_output(blocks: list[Block], block: Block) -> list[str]:
    """Return the lines of the ``text`` block that follows ``block``: its expected output."""
    following = blocks[blocks.index(block) + 1:]
    assert following and following[0].language == "text", (
        f"docs/tutorial.md line {block.line}: a block that expects an exit code must be followed "
        "by a text block with its expected output")
    return [line.strip() for line in following[0].code.splitlines() if line.strip()]


def tutorial_script(blocks: list[Block], logs: Path) -> str:
    """Return one bash script that runs the ``sh`` blocks in order, marking where each starts."""
    lines = ["set -euo pipefail"]
    for block in blocks:
        if block.language != "sh":
            continue
        lines.append(f"printf '\\n### docs/tutorial.md line {block.line}\\n'")
        if block.expected_exit is None:
            lines.append(block.code)
            continue
        output, status = (shlex.quote(str(logs / f"line-{block.line}.{suffix}"))
                          for suffix in ("out", "status"))
        # The subshell keeps errexit, so it ends at its first failing command, with that status.
        lines += ["set +e", "(", "set -euo pipefail", block.code, f") > {output} 2>&1",
                  f"echo $? > {status}", "set -e", f"cat {output}"]
    return "\n".join(lines) + "\n"


def prepare_root(root: Path) -> None:
    """Lay out ``root`` like the repository root, with links to what the tutorial reads.

    ``.venv`` contains a link to this interpreter's ``bin`` and an install stamp newer than
    ``Makefile`` and ``pyproject.toml``, so the tutorial's ``make install`` finds nothing to do.
    Whether the environment itself is current is ``make test``'s concern: it runs ``make install``
    before pytest.
    """
    for name in LINKED:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(REPO / name)
    bin_folder = Path(sys.prefix) / "bin"
    assert (bin_folder / "neurosteer").is_file(), f"run pytest with the project's .venv; got {sys.prefix}"
    (root / ".venv").mkdir()
    (root / ".venv" / "bin").symlink_to(bin_folder)
    stamp = root / ".venv" / ".neurosteer-installed"
    stamp.touch()
    newest = max((REPO / name).stat().st_mtime for name in ("Makefile", "pyproject.toml"))
    os.utime(stamp, (newest + 1, newest + 1))
    # Never let make run the install recipe here: it would reinstall neurosteer from this folder.
    question = subprocess.run(["make", "-q", "install"], cwd=root, capture_output=True, text=True)
    assert question.returncode == 0, f"make install would run its recipe:\n{question.stdout}"


@dataclass(frozen=True)
class TutorialRun:
    """The tutorial run once: the folder it ran in, the folder of its logs, its blocks and result."""

    root: Path
    logs: Path
    blocks: list[Block] = field(repr=False)
    completed: subprocess.CompletedProcess = field(repr=False)


@pytest.fixture(scope="module")
def tutorial_run(tmp_path_factory) -> TutorialRun:
    """Run the tutorial once. The tests below check what it printed and wrote, even after a failure."""
    root = tmp_path_factory.mktemp("tutorial") / "neurosteer"
    logs = root.parent / "logs"
    root.mkdir()
    logs.mkdir()
    prepare_root(root)

    blocks = read_blocks(TUTORIAL.read_text(encoding="utf-8"))
    script = logs / "tutorial.sh"
    script.write_text(tutorial_script(blocks, logs), encoding="utf-8")
    environment = dict(os.environ, PATH=f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ['PATH']}")
    completed = subprocess.run(["bash", str(script)], cwd=root, env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=TIMEOUT_S)
    return TutorialRun(root, logs, blocks, completed)


def only_session(root: Path) -> Path:
    sessions = sorted((root / "my_lab" / "sessions").glob("*.h5"))
    assert len(sessions) == 1, f"expected one session file, found {sessions}"
    return sessions[0]


def test_tutorial_blocks_parsed():
    blocks = read_blocks(TUTORIAL.read_text(encoding="utf-8"))
    sh_blocks = [block for block in blocks if block.language == "sh"]
    assert len(sh_blocks) >= 8
    assert all(block.code.strip() for block in sh_blocks)
    assert any(block.expected_exit is not None for block in sh_blocks)


def test_every_command_succeeds(tutorial_run):
    completed = tutorial_run.completed
    assert completed.returncode == 0, (
        f"the tutorial failed with exit code {completed.returncode} in the block after the last "
        f"'### docs/tutorial.md line' marker:\n{completed.stdout[-8000:]}")


def test_expected_failures_exit_and_list_problems(tutorial_run):
    logs, blocks = tutorial_run.logs, tutorial_run.blocks
    failing = [block for block in blocks if block.language == "sh" and block.expected_exit is not None]
    for block in failing:
        status_file = logs / f"line-{block.line}.status"
        assert status_file.is_file(), f"line {block.line} never ran: see test_every_command_succeeds"
        status = int(status_file.read_text())
        output = (logs / f"line-{block.line}.out").read_text()
        assert status == block.expected_exit, f"line {block.line}:\n{output}"
        for line in expected_output(blocks, block):
            assert line in output, f"line {block.line}: {line!r} missing from:\n{output}"


def test_session_complete(tutorial_run):
    with h5py.File(only_session(tutorial_run.root), "r") as file:
        assert file.attrs["status"] == "complete"
        assert file.attrs["kind"] == "dry_run"
        trials = read_trials(file)
    assert len(trials["trial"]) == N_CALIBRATION + 4 * (CLOSED_LOOP_PER_CONDITION
                                                        + EVALUATION_PER_CONDITION)


def test_new_condition_in_trials(tutorial_run):
    with h5py.File(only_session(tutorial_run.root), "r") as file:
        trials = read_trials(file)
    for phase, expected in (("closed_loop", CLOSED_LOOP_PER_CONDITION),
                            ("evaluation", EVALUATION_PER_CONDITION)):
        conditions = trials["condition"][trials["phase"] == phase].tolist()
        for condition in ("drive", "suppress", "baseline", NEW_CONDITION):
            assert conditions.count(condition) == expected, (phase, condition, conditions)


def test_target_channels_are_new_set(tutorial_run):
    with h5py.File(only_session(tutorial_run.root), "r") as file:
        experiment = json.loads(file["config/experiment_effective"][()])
        rig = tomllib.loads(file["config/rig"][()].decode("utf-8"))
        stream = next(iter(file["streams"].values()))
        channel_names = json.loads(stream.attrs["channel_names"])
        observed = file["trials/observed_channels"][()]
    assert experiment["response"]["target_channels"] == TARGET_CHANNELS
    assert rig["simulator"]["target_channels"] == list(range(8))

    # The simulated subject responds on the new channels only, with a noise-free mean of about 2
    # (stream units) there and 0 elsewhere. Two runs gave a difference of 1.7, and the noise leaves a
    # standard error of about 0.2 on it (an estimate: SD 1/0.3 per channel and trial, 8 x 36 values).
    targets = [channel_names.index(name) for name in TARGET_CHANNELS]
    others = [index for index, name in enumerate(channel_names)
              if name.startswith("ECOG") and name not in TARGET_CHANNELS]
    assert observed[:, targets].mean() - observed[:, others].mean() > 1.0


def test_report_written(tutorial_run):
    session = only_session(tutorial_run.root)
    figure, report = session.with_suffix(".png"), session.with_name(f"{session.stem}_report.md")
    assert figure.is_file(), f"{figure.name} not written: see test_every_command_succeeds"
    assert report.is_file(), f"{report.name} not written: see test_every_command_succeeds"
    assert figure.stat().st_size > 10_000
    assert NEW_CONDITION in report.read_text()


def test_export_written(tutorial_run):
    session = only_session(tutorial_run.root)
    folder = session.with_name(f"{session.stem}_export")
    assert folder.is_dir(), f"{folder.name} not written: see test_every_command_succeeds"
    names = sorted(path.name for path in folder.iterdir())
    for suffix in ("_events.tsv", "_events.json", "_ieeg.vhdr", "_ieeg.vmrk", "_ieeg.eeg",
                   "_ieeg.json"):
        assert sum(name.endswith(suffix) for name in names) == 1, (suffix, names)
    events = next(folder.glob("*_events.tsv")).read_text().splitlines()
    assert len(events) == 1 + N_CALIBRATION + 4 * (CLOSED_LOOP_PER_CONDITION
                                                    + EVALUATION_PER_CONDITION)
    assert sum(f"\t{NEW_CONDITION}\t" in row for row in events) == (CLOSED_LOOP_PER_CONDITION
                                                                    + EVALUATION_PER_CONDITION)
