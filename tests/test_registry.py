"""The Python API: plugins register conditions and rules by name, and experiment files use them.

Runs the shipped custom-policy example (experiments/custom_policy) in-process on the synthetic
pool of test_controller, with a counting wrapper around its selection rule.
"""

from __future__ import annotations

import numpy as np
import pytest

from loop import registry
from loop.clock import SteppedClock
from loop.config import load_experiment
from loop.controller import Controller
from loop.errors import ConfigError
from loop.offline import DiscardMarkers
from loop.presentation import HeadlessPresenter

from .test_config import REPO
from .test_controller import LinearSubject, synthetic_pool

EXAMPLE = REPO / "experiments" / "custom_policy" / "language_thompson.toml"


def example_copy(tmp_path, **changes):
    """Copy the example and its plugin to ``tmp_path``, the base path made absolute."""
    text = EXAMPLE.read_text(encoding="utf-8").replace(
        '"../language_drive_suppress.toml"',
        f'"{(REPO / "experiments" / "language_drive_suppress.toml").as_posix()}"')
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "thompson_moderate.py").write_text(
        (EXAMPLE.parent / "thompson_moderate.py").read_text(encoding="utf-8"), encoding="utf-8")
    path = tmp_path / "example.toml"
    path.write_text(text, encoding="utf-8")
    return path


def count_calls(name):
    """Wrap the registered selection rule ``name``; return the list of conditions it is called for."""
    original = registry.SELECTIONS.get(name)
    calls = []

    def counting(choice):
        calls.append(choice.condition)
        return original(choice)

    registry.SELECTIONS.register(name, counting, replace=True)
    return calls


def run_example(experiment):
    pool, features = synthetic_pool(n=900)
    subject = LinearSubject(pool, features[6], noise_sd=1.0, seed=3)
    clock = SteppedClock(100.0)
    controller = Controller(experiment, pool, features, [0, 1],
                            HeadlessPresenter(clock, DiscardMarkers()), subject, clock,
                            np.random.default_rng(5))
    return controller.run()


def test_example_registers_its_names():
    experiment = load_experiment(EXAMPLE)
    assert experiment.closed_loop.selection == "thompson"
    assert "thompson" in registry.SELECTIONS
    assert "moderate" in registry.CONDITIONS
    assert "separated" in registry.STOP_RULES


def test_example_runs_with_its_condition_and_rule(tmp_path):
    # No stop rule, so that all four blocks run and the counts are exact.
    experiment = load_experiment(example_copy(tmp_path, **{
        'stop_rule = "separated"': 'stop_rule = "never"'}))
    counted_thompson = count_calls("thompson")
    state = run_example(experiment)
    closed = [record.condition for record in state.trials if record.phase == "closed_loop"]
    assert len(closed) == 4 * (12 + 12 + 12 + 6)
    assert closed.count("moderate") == 4 * 6
    # The rule chose every closed-loop trial with an objective; baseline trials are drawn apart.
    assert len(counted_thompson) == 4 * (12 + 12 + 6)
    assert set(counted_thompson) == {"drive", "suppress", "moderate"}
    evaluation = [record.condition for record in state.trials if record.phase == "evaluation"]
    assert evaluation.count("moderate") == 50
    texts = [record.text for record in state.trials]
    assert len(set(texts)) == len(texts)


def test_moderate_sentences_sit_between_drive_and_suppress(tmp_path):
    experiment = load_experiment(example_copy(tmp_path, **{
        'stop_rule = "separated"': 'stop_rule = "never"'}))
    state = run_example(experiment)
    predicted = {name: np.mean([r.predicted for r in state.trials
                                if r.phase == "evaluation" and r.condition == name])
                 for name in ("drive", "moderate", "suppress")}
    assert predicted["drive"] > predicted["moderate"] > predicted["suppress"]


def test_stop_rule_ends_the_closed_loop_early(tmp_path):
    state = run_example(load_experiment(example_copy(tmp_path)))
    blocks = {record.block for record in state.trials if record.phase == "closed_loop"}
    # The synthetic subject separates drive from suppress by far more than 1.5 after one block.
    assert blocks == {1}
    assert [record.phase for record in state.trials][-1] == "evaluation"


def test_unknown_names_listed_in_one_error(tmp_path):
    path = example_copy(tmp_path, **{'selection = "thompson"': 'selection = "thomson"',
                                     "moderate = 6": "moderat = 6"})
    with pytest.raises(ConfigError) as caught:
        load_experiment(path)
    message = str(caught.value)
    assert f"{path}: closed_loop.selection: no selection rule named 'thomson'" in message
    assert "closed_loop.extra_conditions.moderat: no condition named 'moderat'" in message
    assert "registered: greedy, thompson, ucb" in message


def test_broken_plugin_named(tmp_path):
    path = example_copy(tmp_path)
    (tmp_path / "thompson_moderate.py").write_text("import numpy as np\nraise RuntimeError('x')\n")
    with pytest.raises(ConfigError, match="experiment.plugins: Plugin file .*thompson_moderate.py "
                                          "failed to import: RuntimeError: x"):
        load_experiment(path)


def test_duplicate_name_rejected():
    with pytest.raises(ValueError, match="A condition named 'drive' is already registered "
                                         r"\(built in\)"):
        registry.condition("drive")(lambda mean, sd: (mean[:, 0], sd[:, 0]))


def test_rule_returning_unavailable_candidate_rejected(tmp_path):
    registry.SELECTIONS.register("first_always", lambda choice: 0, replace=True)
    experiment = load_experiment(example_copy(tmp_path, **{
        'selection = "thompson"': 'selection = "first_always"'}))
    with pytest.raises(ValueError, match="chose candidate 0, which is not available"):
        run_example(experiment)
