"""The Python API for what an experiment file cannot express: named conditions, selection rules,
block orders and stop rules.

Runs in the session's process. A lab writes small functions in a Python file beside its
experiment, registers each under a name with the decorators below, and lists the file under
``[experiment] plugins``. The experiment file then uses the names: ``[closed_loop]
extra_conditions``, ``selection``, ``order`` and ``stop_rule``. neurosteer's own conditions and
rules are registered here the same way, so a plugin's functions are called exactly as the built-in ones are.

A plugin file::

    import numpy as np
    from loop.registry import condition, selection

    @condition("moderate")
    def moderate(mean, sd):
        # Sentences predicted near the pool's median response.
        median = np.median(mean[:, 0])
        return -np.abs(mean[:, 0] - median), sd[:, 0]

    @selection("thompson")
    def thompson(choice):
        draws = choice.rng.normal(choice.value, choice.sd)
        return int(np.argmax(np.where(choice.available, draws, -np.inf)))

Conditions return a value to maximise per candidate and its predictive SD, ``(n_pool,)`` each,
from the model's predicted means and SDs ``(n_pool, n_targets)``. A condition registered with
``objective=None`` draws its stimuli at random (like ``baseline``).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loop.selection import select_top
from synth.objectives import Drive, Suppress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    """The inputs of a selection rule when it picks the next stimulus of a condition.

    ``value`` and ``sd`` are the condition's objective per candidate (``(n_pool,)``; a random
    condition never reaches a selection rule), ``available`` the candidates that may be shown,
    ``exploration`` the
    experiment's ``encoding.exploration``, and ``rng`` the session's seeded Generator, which is the
    only source of randomness a rule may use (a resumed session replays its draws).
    """

    condition: str
    value: np.ndarray
    sd: np.ndarray
    available: np.ndarray
    exploration: float
    rng: np.random.Generator


@dataclass(frozen=True)
class BlockResult:
    """The inputs of a stop rule after each closed-loop block."""

    block: int
    n_blocks: int
    conditions: list[str]
    observed: list[float]
    predicted: list[float]
    cv_r: float


class Registry:
    """Functions registered under names, one kind of function per registry."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, object] = {}
        self.builtin: frozenset[str] = frozenset()

    def register(self, name: str, entry, replace: bool = False) -> None:
        """Register ``entry`` as ``name``.

        A plugin's name replaces an earlier plugin's, with a log line. That happens when the same
        plugin file is copied beside another experiment. A built-in name is replaced only with
        ``replace``.
        """
        if not name or not name.replace("_", "").isalnum():
            raise ValueError(f"A {self.kind} name must be letters, digits and underscores; got "
                             f"{name!r}.")
        if name in self.builtin and not replace:
            raise ValueError(f"A {self.kind} named {name!r} is already registered (built in). "
                             "Choose another name.")
        if name in self._entries and not replace:
            logger.info("The %s %r is registered again; the latest registration is used.",
                        self.kind, name)
        self._entries[name] = entry

    def get(self, name: str):
        if name not in self._entries:
            raise KeyError(f"No {self.kind} named {name!r}; registered: {self.names()}.")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


@dataclass(frozen=True)
class Condition:
    """A named condition: its objective, or None to draw stimuli at random."""

    name: str
    objective: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None


CONDITIONS = Registry("condition")
SELECTIONS = Registry("selection rule")
ORDERS = Registry("block order")
STOP_RULES = Registry("stop rule")


def condition(name: str, random: bool = False):
    """Register ``function(mean, sd) -> (value, sd)`` as the objective of condition ``name``.

    With ``random=True`` the function is not called and the condition's stimuli are drawn at
    random; decorate any function, e.g. ``lambda mean, sd: None``.
    """
    def decorate(function):
        CONDITIONS.register(name, Condition(name, None if random else function))
        return function
    return decorate


def selection(name: str):
    """Register ``function(choice: Choice) -> int``, which returns the index of the next stimulus."""
    def decorate(function):
        SELECTIONS.register(name, function)
        return function
    return decorate


def order(name: str):
    """Register ``function(conditions: list[str], rng) -> list[str]``, one block's trial order."""
    def decorate(function):
        ORDERS.register(name, function)
        return function
    return decorate


def stop_rule(name: str):
    """Register ``function(result: BlockResult) -> bool``; True ends the closed loop after a block."""
    def decorate(function):
        STOP_RULES.register(name, function)
        return function
    return decorate


# Built-in entries

CONDITIONS.register("drive", Condition("drive", Drive(0).evaluate))
CONDITIONS.register("suppress", Condition("suppress", Suppress(0).evaluate))


@condition("baseline", random=True)
def _baseline(mean, sd):
    return None


@selection("ucb")
def _upper_confidence_bound(choice: Choice) -> int:
    """Return the candidate with the highest value + exploration x SD."""
    return int(select_top(choice.value, choice.sd, choice.available, choice.exploration, 1)[0])


@selection("greedy")
def _greedy(choice: Choice) -> int:
    """Return the candidate with the highest predicted value, ignoring its uncertainty."""
    return int(select_top(choice.value, choice.sd, choice.available, 0.0, 1)[0])


@order("shuffled")
def _shuffled(conditions: list[str], rng: np.random.Generator) -> list[str]:
    return [str(name) for name in rng.permutation(conditions)]


@order("interleaved")
def _interleaved(conditions: list[str], rng: np.random.Generator) -> list[str]:
    """Conditions in turn (drive, suppress, baseline, drive, ...), the same order every block."""
    groups: dict[str, list[str]] = {}
    for name in conditions:
        groups.setdefault(name, []).append(name)
    ordered = []
    while any(groups.values()):
        for group in groups.values():
            if group:
                ordered.append(group.pop())
    return ordered


@stop_rule("never")
def _never(result: BlockResult) -> bool:
    return False


for _registry in (CONDITIONS, SELECTIONS, ORDERS, STOP_RULES):
    _registry.builtin = frozenset(_registry.names())


def load_plugins(paths: list[Path]) -> None:
    """Import each plugin file once, so that its decorators register its functions.

    Raises ImportError naming the file when it is missing or fails to import.
    """
    for path in paths:
        path = Path(path).resolve()
        module_name = f"neurosteer_plugin_{path.stem}_{abs(hash(str(path))):x}"
        if module_name in sys.modules:
            continue
        if not path.is_file():
            raise ImportError(f"Plugin file {path} does not exist.")
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[module_name]
            raise ImportError(f"Plugin file {path} failed to import: {type(err).__name__}: "
                              f"{err}") from err
        logger.info("Loaded plugin %s.", path)
