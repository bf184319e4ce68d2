"""A plugin for experiments/custom_policy/language_thompson.toml: a selection rule, a condition and
a stop rule written against neurosteer's Python API (loop/registry.py).

Copy this file beside your experiment, rename the functions, and list the file under
[experiment] plugins. Each function gets everything it may use as arguments; randomness comes only
from the Generator passed in, so a session stays reproducible and resumable.
"""

import numpy as np

from loop.registry import BlockResult, Choice, condition, selection, stop_rule


@selection("thompson")
def thompson(choice: Choice) -> int:
    """Thompson sampling: draw each candidate's value from its predictive distribution, take the best."""
    candidates = np.flatnonzero(choice.available)
    draws = choice.rng.normal(choice.value[candidates], choice.sd[candidates])
    return int(candidates[np.argmax(draws)])


@condition("moderate")
def moderate(mean: np.ndarray, sd: np.ndarray):
    """Sentences predicted to give a response near the pool's median: a mid-level condition."""
    distance = np.abs(mean[:, 0] - np.median(mean[:, 0]))
    return -distance, sd[:, 0]


@stop_rule("separated")
def separated(result: BlockResult) -> bool:
    """End the closed loop once a block's drive trials beat its suppress trials by 1.5 units."""
    observed = np.array(result.observed)
    conditions = np.array(result.conditions)
    drive = observed[conditions == "drive"]
    suppress = observed[conditions == "suppress"]
    if len(drive) == 0 or len(suppress) == 0:
        return False
    return bool(np.nanmean(drive) - np.nanmean(suppress) > 1.5)
