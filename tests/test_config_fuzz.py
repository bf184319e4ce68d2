"""Fuzzing the experiment and rig loaders: any input either loads or raises ConfigError.

Bounded: a fixed number of examples per test (hypothesis), about ten seconds in all.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loop.config import load_experiment, load_rig
from loop.errors import ConfigError

from .test_config import EXPERIMENT, RIG

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
POOL = str(EXPERIMENT.parent.parent / "tests" / "data" / "pool_small.txt")
BASE_EXPERIMENT = EXPERIMENT.read_text(encoding="utf-8").replace(
    "builtin:pool_gemma3_270m_6w.txt", POOL)
ASSIGNMENTS = [match.start() for match in re.finditer(r"^\w+ = ", BASE_EXPERIMENT, re.MULTILINE)]

toml_values = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
    st.booleans().map(lambda value: str(value).lower()),
    st.text(max_size=12).map(lambda text: '"' + text.replace("\\", "").replace('"', "") + '"'),
    st.lists(st.integers(-5, 70), max_size=4).map(str),
    st.just("[1, 2"), st.just('"unterminated'), st.just(""),
)


def assert_loads_or_config_error(path, loader):
    try:
        loader(path)
    except ConfigError as err:
        message = str(err)
        assert message
        assert all(line.startswith(str(path)) for line in message.splitlines())


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "experiment.toml"
    path.write_bytes(data)
    assert_loads_or_config_error(path, load_experiment)


@FUZZ
@given(position=st.sampled_from(ASSIGNMENTS), value=toml_values,
       extra_key=st.sampled_from(["", "colour", "n_blocs", "seed"]))
def test_mutated_experiment(tmp_path_factory, position, value, extra_key):
    line_end = BASE_EXPERIMENT.index("\n", position)
    key = BASE_EXPERIMENT[position:BASE_EXPERIMENT.index(" = ", position)]
    text = BASE_EXPERIMENT[:position] + f"{key} = {value}" + BASE_EXPERIMENT[line_end:]
    if extra_key:
        text = text.replace("[timing]\n", f"[timing]\n{extra_key} = 1\n")
    path = tmp_path_factory.mktemp("fuzz") / "experiment.toml"
    path.write_text(text, encoding="utf-8")
    assert_loads_or_config_error(path, load_experiment)


@FUZZ
@given(value=toml_values, key=st.sampled_from(
    ["n_channels", "sfreq", "snr", "target_channels", "latency_s", "seed", "surprisal_model"]))
def test_mutated_rig(tmp_path_factory, value, key):
    text = re.sub(rf"^{key} = .*$", f"{key} = {value}", RIG.read_text(encoding="utf-8"),
                  count=1, flags=re.MULTILINE)
    path = tmp_path_factory.mktemp("fuzz") / "rig.toml"
    path.write_text(text, encoding="utf-8")
    assert_loads_or_config_error(path, load_rig)
