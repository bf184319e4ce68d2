"""The ``neurosteer`` command: run sessions, rebuild reports, build candidate pools, simulate.

Runs on the stimulus PC (or a laptop for dry runs). Errors that the user can fix (a malformed
file, a missing model or stream) end the command with one clear message and exit code 2; the
session file of a session that stopped keeps every completed trial.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_EXPERIMENT = REPO / "experiments" / "language_drive_suppress.toml"
DEFAULT_RIG = REPO / "hardware_configs" / "simulated_ecog.toml"

logger = logging.getLogger("neurosteer")
DEFAULTS = argparse.ArgumentDefaultsHelpFormatter


class Progress:
    """Terminal progress for a running session (rich), updated once per trial."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self.console = console
        self._progress = Progress("[bold]{task.description}", BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), "{task.fields[status]}", console=console)
        self._task = None
        self._sums: dict[str, list[float]] = {}
        self._faults: dict[str, int] = {}

    def __enter__(self) -> Progress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def __call__(self, n_done: int) -> None:
        """Advance the feature-extraction bar by ``n_done`` sentences."""
        if self._task is None:
            self._task = self._progress.add_task("features", total=None, status="")
        self._progress.advance(self._task, n_done)

    def phase(self, name: str, n_trials: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, visible=False)
        self._task = self._progress.add_task(name, total=n_trials, status="")
        self._sums = {}

    def trial(self, record) -> None:
        if record.epoch_ok:
            # A trial lost to a stream gap has no response to average.
            entry = self._sums.setdefault(record.condition, [0.0, 0.0, 0])
            entry[0] += record.observed
            entry[1] += 0.0 if np.isnan(record.predicted) else record.predicted
            entry[2] += 1
        self._progress.update(self._task, advance=1, status=self._status())

    def fault(self, kind: str) -> None:
        """Count one fault of ``kind``; the status line shows the counts."""
        self._faults[kind] = self._faults.get(kind, 0) + 1
        if self._task is not None:
            self._progress.update(self._task, status=self._status())

    def _status(self) -> str:
        means = "  ".join(f"{name} obs {sum_obs / n:+.2f} pred {sum_pred / n:+.2f}"
                          for name, (sum_obs, sum_pred, n) in self._sums.items())
        if not self._faults:
            return means
        faults = ", ".join(f"{kind} {count}" for kind, count in sorted(self._faults.items()))
        return f"[red]faults: {faults}[/red]  {means}"


def _cmd_run(args) -> int:
    from rich.console import Console

    from loop.report import write_report
    from loop.session import SessionOptions, run_session

    console = Console()
    if not console.is_terminal:
        # Written to a file, the status line with the running means would be cut at 80 columns.
        console = Console(width=200)
    started = time.perf_counter()
    options = SessionOptions(Path(args.output), args.speed, args.display, args.seed)
    with Progress(console) as progress:
        path = run_session(Path(args.experiment), Path(args.rig), options, progress)
    summary, figure, report = write_report(path)
    console.print(summary, highlight=False, soft_wrap=True)
    console.print(f"\nSession file: {path}\nFigure: {figure}\nReport: {report}")
    console.print(f"Finished in {time.perf_counter() - started:.0f} s.")
    return 0


def _cmd_resume(args) -> int:
    from rich.console import Console

    from loop.recovery import recover_session
    from loop.report import write_report
    from loop.session import SessionOptions, run_session

    recovered = recover_session(Path(args.session))
    metadata = recovered.metadata
    experiment = Path(args.experiment or metadata["experiment_file"])
    rig = Path(args.rig or metadata["rig_file"])
    console = Console() if Console().is_terminal else Console(width=200)
    console.print(f"{recovered.path.name}: {recovered.n_trials} completed trials (from the "
                  f"{recovered.source}); damage: {recovered.damage_summary()}.")
    display = args.display or metadata.get("display") == "psychopy"
    options = SessionOptions(recovered.path.parent, float(metadata.get("speed", 1.0)), display,
                             int(metadata["seed"]))
    started = time.perf_counter()
    with Progress(console) as progress:
        path = run_session(experiment, rig, options, progress, resume=recovered)
    summary, figure, report = write_report(path)
    console.print(summary, highlight=False, soft_wrap=True)
    console.print(f"\nSession file: {path}\nFigure: {figure}\nReport: {report}")
    console.print(f"Finished in {time.perf_counter() - started:.0f} s.")
    return 0


def _cmd_report(args) -> int:
    from loop.report import write_report

    summary, figure, report = write_report(Path(args.session))
    print(summary)
    print(f"\nFigure: {figure}\nReport: {report}")
    return 0


def _cmd_inspect(args) -> int:
    from loop.inspect_session import inspect_session

    path = Path(args.session)
    if not path.is_file():
        print(f"neurosteer: {path}: session file not found.", file=sys.stderr)
        return 2
    print(inspect_session(path))
    return 0


def _cmd_export(args) -> int:
    from loop.export import ExportError, NoContinuousDataError, export_bids_events, export_raw

    path = Path(args.session)
    if not path.is_file():
        print(f"neurosteer: {path}: session file not found.", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else path.with_name(f"{path.stem}_export")
    labels = {"subject": args.subject, "session": args.session_label, "task": args.task}
    try:
        events, sidecar = export_bids_events(path, out, overwrite=args.overwrite, **labels)
        print(f"Events: {events}\nEvents sidecar: {sidecar}")
        written = export_raw(path, out, args.format, unit=args.unit, overwrite=args.overwrite,
                             **labels)
    except NoContinuousDataError as err:
        # The events are written; a session without a recording has nothing more to export.
        print(f"No continuous data written: {err}")
        return 0
    except (ExportError, ValueError) as err:
        print(f"neurosteer: {err}", file=sys.stderr)
        return 2
    for export in written:
        print(f"Recording ({export.source}): {export.path}\nTiming sidecar: {export.sidecar}")
    return 0


def _cmd_pool_build(args) -> int:
    from rich.progress import Progress as Bar

    from synth.generation import generate_pool, write_pool
    from synth.models import load_causal_lm

    loaded = load_causal_lm(args.model, args.device, args.dtype)
    with Bar() as bar:
        task = bar.add_task("sentences", total=args.n)
        result = generate_pool(loaded, args.n, n_words=args.words, seed=args.seed,
                               top_p=args.top_p, temperature=args.temperature,
                               batch_size=args.batch_size,
                               progress=lambda done, total: bar.update(task, completed=done))
    write_pool(Path(args.output), result.sentences, result.metadata())
    print(f"Wrote {len(result.sentences)} sentences to {args.output} in {result.elapsed_s:.0f} s "
          f"({result.sentences_per_s:.1f} per second).")
    return 0


def _cmd_simulate(args) -> int:
    from acquisition.simulated import run_simulator
    from loop.config import load_experiment, load_rig, resolve_data_path
    from loop.session import _simulator_config

    rig_path, experiment_path = Path(args.rig), Path(args.experiment)
    rig, experiment = load_rig(rig_path), load_experiment(experiment_path)
    if rig.simulator is None:
        print(f"{rig_path}: this rig has no [simulator] table.", file=sys.stderr)
        return 2
    pool_file = resolve_data_path(experiment.pool.file, experiment_path.parent)
    config = _simulator_config(rig, rig_path, pool_file, experiment.pool.n_words,
                               Path(args.log), args.speed)
    run_simulator(config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neurosteer",
        description="Run closed-loop neural control sessions, rebuild their reports, build "
                    "candidate pools, and run the simulated subject.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", formatter_class=DEFAULTS,
                           help="run a session (a dry run on a simulated rig)")
    run.add_argument("experiment", nargs="?", default=str(DEFAULT_EXPERIMENT),
                     help="experiment file (TOML)")
    run.add_argument("--rig", default=str(DEFAULT_RIG), help="rig file (TOML)")
    run.add_argument("--speed", type=float, default=1.0,
                     help="divide every duration by this factor (dry runs only)")
    run.add_argument("--display", action="store_true", help="show stimuli in a PsychoPy window")
    run.add_argument("--output", default="sessions", help="folder for the session files")
    run.add_argument("--seed", type=int, default=None, help="override the experiment's seed")
    run.set_defaults(handler=_cmd_run)

    resume = commands.add_parser(
        "resume", formatter_class=DEFAULTS,
        help="continue a session that stopped (a crash, a lost stream, the end key) in a new file")
    resume.add_argument("session", help="session file (.h5) of the stopped session")
    resume.add_argument("--experiment", default=None,
                        help="experiment file, if it moved (default: the path the session used)")
    resume.add_argument("--rig", default=None,
                        help="rig file, if it moved (default: the path the session used)")
    resume.add_argument("--display", action="store_true",
                        help="show stimuli in a PsychoPy window (default: as the session did)")
    resume.set_defaults(handler=_cmd_resume)

    report = commands.add_parser("report", formatter_class=DEFAULTS,
                              help="rebuild the report and figure of a session")
    report.add_argument("session", help="session file (.h5)")
    report.set_defaults(handler=_cmd_report)

    inspect = commands.add_parser("inspect", formatter_class=DEFAULTS,
                                  help="summarise what a session file contains")
    inspect.add_argument("session", help="session file (.h5)")
    inspect.set_defaults(handler=_cmd_inspect)

    # No DEFAULTS formatter: it would add "(default: None)" to the options whose default is derived.
    export = commands.add_parser(
        "export",
        help="write a session's trials as BIDS events and its recording as BrainVision or FIF")
    export.add_argument("session", help="session file (.h5)")
    export.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: <session file name>_export beside it)")
    export.add_argument("--format", choices=("brainvision", "fif"), default="brainvision",
                        help="file format of the continuous recording (default: brainvision)")
    export.add_argument("--subject", default=None, metavar="LABEL",
                        help="BIDS subject label (default: 01)")
    export.add_argument("--session", dest="session_label", default=None, metavar="LABEL",
                        help="BIDS session label (default: the session's start time)")
    export.add_argument("--task", default=None, metavar="LABEL",
                        help="BIDS task label (default: the experiment's name)")
    export.add_argument("--unit", default=None,
                        help="unit of the stream values: V, mV, uV or nV for voltages, anything "
                             "else for misc channels (default: uV on live rigs, a.u. simulated)")
    export.add_argument("--overwrite", action="store_true", help="replace existing output files")
    export.set_defaults(handler=_cmd_export)

    pool = commands.add_parser("pool", formatter_class=DEFAULTS,
                            help="candidate pools")
    pool_commands = pool.add_subparsers(dest="pool_command", required=True)
    build = pool_commands.add_parser("build", formatter_class=DEFAULTS,
                                  help="generate a pool with a language model")
    build.add_argument("--model", default="embedded:gemma3-270m", help="model name or folder")
    build.add_argument("--n", type=int, default=3000, help="number of sentences")
    build.add_argument("--words", type=int, default=6, help="words per sentence")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--top-p", type=float, default=0.9, help="nucleus mass for sampling")
    build.add_argument("--temperature", type=float, default=1.0)
    build.add_argument("--batch-size", type=int, default=64)
    build.add_argument("--device", default="auto", help="auto, cpu or cuda")
    build.add_argument("--dtype", default="auto", help="auto, bfloat16 or float32")
    build.add_argument("--output", required=True, help="pool file to write (.txt)")
    build.set_defaults(handler=_cmd_pool_build)

    simulate = commands.add_parser("simulate", formatter_class=DEFAULTS,
                                help="run the simulated subject on its own")
    simulate.add_argument("--rig", default=str(DEFAULT_RIG), help="rig file with [simulator]")
    simulate.add_argument("--experiment", default=str(DEFAULT_EXPERIMENT),
                          help="experiment whose pool is the truth's reference")
    simulate.add_argument("--speed", type=float, default=1.0,
                          help="divide every duration by this factor (match the session's --speed)")
    simulate.add_argument("--log", default="simulator.jsonl", help="truth log (JSON lines)")
    simulate.set_defaults(handler=_cmd_simulate)

    validate = commands.add_parser(
        "validate", formatter_class=DEFAULTS,
        help="check an experiment and a rig before a session, and print the plan")
    validate.add_argument("experiment", nargs="?", default=str(DEFAULT_EXPERIMENT),
                          help="experiment file (TOML)")
    validate.add_argument("--rig", default=str(DEFAULT_RIG), help="rig file (TOML)")
    validate.add_argument("--streams", action="store_true",
                          help="also check that the rig's LSL streams can be found (live rigs)")
    validate.add_argument("--display", action="store_true",
                          help="also open the window and check every sentence's fit and glyphs")
    validate.add_argument("--speed", type=float, default=1.0,
                          help="show the plan's durations divided by this factor")
    validate.set_defaults(handler=_cmd_validate)

    bridge = commands.add_parser(
        "bridge", formatter_class=DEFAULTS,
        help="publish per-TR ROI means of NIfTI or DICOM volumes written into a folder")
    bridge.add_argument("folder", help="folder the scanner writes volumes into")
    bridge.add_argument("--pattern", default="vol_{tr:04d}.nii",
                        help="file name pattern; {tr} is the TR index (see docs/fmri.md)")
    bridge.add_argument("--mask", action="append", required=True, metavar="NAME=FILE",
                        help="one ROI: its name and a NIfTI mask file; repeat per ROI, in the "
                             "order of the rig's zmq.roi_names")
    bridge.add_argument("--address", default="tcp://127.0.0.1:5570",
                        help="ZeroMQ endpoint to publish on (the rig's zmq.address)")
    bridge.add_argument("--allow-remote", action="store_true",
                        help="allow an address beyond this machine")
    bridge.add_argument("--n-trs", type=int, default=None, help="stop after this many TRs")
    bridge.set_defaults(handler=_cmd_bridge)
    return parser


def _cmd_validate(args) -> int:
    from loop.validate import format_plan, validate

    result = validate(Path(args.experiment), Path(args.rig), args.streams, args.display)
    if result.plan:
        print(format_plan(result, args.speed))
    if result.ok:
        print(f"\n{args.experiment} with {args.rig}: no problems found.")
        return 0
    print(f"\n{len(result.problems)} problem(s):", file=sys.stderr)
    for problem in result.problems:
        print(f"  {problem}", file=sys.stderr)
    return 2


def _cmd_bridge(args) -> int:
    from acquisition.volumes import RoiMasks, VolumeBridge, VolumeWatcher
    from acquisition.zmq_bridge import TRPublisher

    masks = {}
    for item in args.mask:
        name, separator, file = item.partition("=")
        if not separator or not name or not file:
            print(f"neurosteer: --mask {item!r}: expected NAME=FILE, e.g. language=lang_mask.nii",
                  file=sys.stderr)
            return 2
        masks[name] = file
    try:
        publisher = TRPublisher(args.address, bind=True, allow_remote=args.allow_remote)
    except ValueError as err:
        print(f"neurosteer: --address: {err}".replace(
            "set `allow_remote = true` in the [zmq] section of the rig file", "pass --allow-remote"),
            file=sys.stderr)
        return 2
    try:
        bridge = VolumeBridge(VolumeWatcher(args.folder, args.pattern), RoiMasks.from_files(masks),
                              publisher)
        print(f"Waiting for the session to connect to {publisher.address} ...")
        publisher.wait_for_subscribers(1, timeout_s=3600.0)
        bridge.run(n_trs=args.n_trs)
    finally:
        publisher.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    from acquisition.errors import ClockBaseError, StreamLostError, StreamNotFoundError
    from acquisition.scanner import TriggerMismatchError, TriggerTimeoutError
    from acquisition.volumes import MaskShapeError
    from acquisition.zmq_bridge import SubscriberNotFoundError
    from loop.errors import ConfigError, DeadlineMissedError, ResumeError, SessionAbortedError
    from loop.text_checks import TextCheckError
    from synth.errors import CacheCorruptError, ModelNotFoundError
    from synth.generation import PoolGenerationError
    from synth.pool import PoolFileError

    args = build_parser().parse_args(argv)
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(show_path=False)])
    for noisy in ("transformers", "sentence_transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except (ConfigError, ModelNotFoundError, CacheCorruptError, PoolFileError,
            StreamNotFoundError, StreamLostError, DeadlineMissedError, SessionAbortedError,
            PoolGenerationError, TextCheckError, TriggerMismatchError, TriggerTimeoutError,
            MaskShapeError, SubscriberNotFoundError, FileExistsError, ResumeError,
            ClockBaseError) as err:
        notes = "".join(f"\n{note}" for note in getattr(err, "__notes__", []))
        print(f"neurosteer: {err}{notes}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
