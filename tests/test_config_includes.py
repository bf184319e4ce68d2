"""Experiment files that extend a base file: the merge, and every problem named with its file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from loop.config import (
    Experiment,
    effective_experiment_text,
    load_experiment,
    read_experiment_toml,
)
from loop.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = REPO / "experiments" / "language_drive_suppress.toml"
SMALL_POOL = REPO / "tests" / "data" / "pool_small.txt"

BASE = f"""\
[experiment]
name = "base"
seed = 3

[model]
layers = [6, 9, 12]
batch_size = 32

[pool]
file = "{SMALL_POOL}"

[response]
target_channels = ["ECOG009", "ECOG010"]
tmin_s = 0.2

[closed_loop]
n_blocks = 2
n_drive = 4
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_child_overrides_base_keys(tmp_path):
    write(tmp_path, "base.toml", BASE)
    child = write(tmp_path, "child.toml", 'extends = "base.toml"\n\n'
                  '[experiment]\nname = "child"\n\n[model]\nlayers = [4]\n\n'
                  "[closed_loop]\nn_drive = 8\n\n[evaluation]\nn_per_condition = 5\n")
    experiment = load_experiment(child)
    assert experiment.experiment.name == "child"
    assert experiment.experiment.seed == 3
    # Lists are replaced, not merged; tables merge key by key.
    assert experiment.model.layers == [4]
    assert experiment.model.batch_size == 32
    assert experiment.closed_loop.n_blocks == 2
    assert experiment.closed_loop.n_drive == 8
    assert experiment.evaluation.n_per_condition == 5
    assert experiment.response.tmin_s == 0.2
    assert experiment.extends == "base.toml"


def test_chain_of_three_files(tmp_path):
    write(tmp_path, "root.toml", BASE)
    write(tmp_path, "lab/middle.toml", 'extends = "../root.toml"\n[timing]\niti_s = 1.5\n')
    leaf = write(tmp_path, "lab/leaf.toml", 'extends = "middle.toml"\n[timing]\niti_jitter_s = 0.1\n')
    merged = read_experiment_toml(leaf)
    assert merged.chain == (leaf, tmp_path / "lab" / "middle.toml",
                            tmp_path / "lab" / "../root.toml")
    assert merged.file_of(("timing", "iti_s")) == tmp_path / "lab" / "middle.toml"
    assert merged.file_of(("timing", "iti_jitter_s")) == leaf
    experiment = load_experiment(leaf)
    assert experiment.timing.iti_s == 1.5
    assert experiment.timing.iti_jitter_s == 0.1
    assert experiment.closed_loop.n_blocks == 2


def test_errors_name_the_file_of_each_key(tmp_path):
    base = write(tmp_path, "base.toml", BASE.replace("batch_size = 32", "batch_sise = 32"))
    child = write(tmp_path, "child.toml",
                  'extends = "base.toml"\n[calibration]\nn_trials = "many"\n')
    with pytest.raises(ConfigError) as caught:
        load_experiment(child)
    lines = sorted(str(caught.value).splitlines())
    assert len(lines) == 2
    assert lines[0].startswith(f"{base}: model.batch_sise: unknown key")
    assert lines[1].startswith(f"{child}: calibration.n_trials: ")
    assert "'many'" in lines[1]


def test_overridden_key_error_names_child(tmp_path):
    write(tmp_path, "base.toml", BASE)
    child = write(tmp_path, "child.toml", 'extends = "base.toml"\n[model]\nlayers = [0]\n')
    with pytest.raises(ConfigError) as caught:
        load_experiment(child)
    assert str(caught.value).startswith(f"{child}: model.layers.0: ")


def test_table_check_names_both_files(tmp_path):
    base = write(tmp_path, "base.toml", BASE)
    child = write(tmp_path, "child.toml", 'extends = "base.toml"\n[response]\ntmax_s = 0.1\n')
    with pytest.raises(ConfigError) as caught:
        load_experiment(child)
    assert str(caught.value) == (f"{child}: response: tmax_s must be larger than tmin_s "
                                 f"(merged from {child} and {base})")


def test_missing_key_names_file_read(tmp_path):
    write(tmp_path, "base.toml", BASE.replace('target_channels = ["ECOG009", "ECOG010"]\n', ""))
    child = write(tmp_path, "child.toml", 'extends = "base.toml"\n')
    with pytest.raises(ConfigError) as caught:
        load_experiment(child)
    assert str(caught.value) == f"{child}: response.target_channels: required key is missing"


def test_missing_base_names_extends_and_path(tmp_path):
    child = write(tmp_path, "child.toml", 'extends = "bases/nowhere.toml"\n')
    with pytest.raises(ConfigError) as caught:
        load_experiment(child)
    assert str(caught.value) == (
        f"{child}: extends: base file 'bases/nowhere.toml' not found (tried "
        f"{tmp_path / 'bases' / 'nowhere.toml'}). Correct the path; it is relative to this file.")


def test_cycle_reported_with_chain(tmp_path):
    first = write(tmp_path, "first.toml", 'extends = "second.toml"\n')
    second = write(tmp_path, "second.toml", 'extends = "first.toml"\n')
    with pytest.raises(ConfigError) as caught:
        load_experiment(first)
    assert str(caught.value) == (
        f"{second}: extends: the files extend each other in a cycle: {first} -> {second} -> "
        f"{tmp_path / 'first.toml'}. Remove the `extends` that closes it.")


def test_file_extending_itself(tmp_path):
    path = write(tmp_path, "self.toml", 'extends = "self.toml"\n')
    with pytest.raises(ConfigError, match=r"self\.toml: extends: the files extend each other"):
        load_experiment(path)


def test_extends_must_be_a_path(tmp_path):
    path = write(tmp_path, "child.toml", "extends = 3\n")
    with pytest.raises(ConfigError) as caught:
        load_experiment(path)
    assert str(caught.value) == (f"{path}: extends: expected the path of a base experiment file, "
                                 "relative to this file (got 3).")


def test_invalid_base_toml_names_base(tmp_path):
    base = write(tmp_path, "base.toml", "[experiment\n")
    child = write(tmp_path, "child.toml", 'extends = "base.toml"\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(base))}: invalid TOML"):
        load_experiment(child)


def test_base_pool_path_relative_to_base(tmp_path):
    shared = tmp_path / "shared"
    pool = write(shared, "pools/pool.txt", SMALL_POOL.read_text(encoding="utf-8"))
    write(shared, "base.toml", BASE.replace(str(SMALL_POOL), "pools/pool.txt"))
    child = write(tmp_path, "studies/child.toml", 'extends = "../shared/base.toml"\n')
    experiment = load_experiment(child)
    assert Path(experiment.pool.file) == pool.resolve()


def test_missing_pool_in_base_names_base(tmp_path):
    base = write(tmp_path, "base.toml", BASE.replace(str(SMALL_POOL), "no_such_pool.txt"))
    child = write(tmp_path, "child.toml", 'extends = "base.toml"\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(base))}: pool\.file: file .*no_such_pool"):
        load_experiment(child)


def test_plain_file_reads_as_before(tmp_path):
    merged = read_experiment_toml(EXPERIMENT)
    assert merged.chain == (EXPERIMENT,)
    assert "extends" not in merged.content
    assert load_experiment(EXPERIMENT).extends is None


def test_split_shipped_experiment_is_equal(tmp_path):
    # The shipped experiment cut in two (everything but [experiment] and [closed_loop] in a base)
    # must load to the same settings.
    text = EXPERIMENT.read_text(encoding="utf-8")
    sections = re.split(r"(?m)^(?=\[)", text)
    child_sections = [s for s in sections if s.startswith(("[experiment]", "[closed_loop]"))]
    base_sections = [s for s in sections if s not in child_sections]
    write(tmp_path, "base.toml", "".join(base_sections))
    child = write(tmp_path, "child.toml", 'extends = "base.toml"\n\n' + "".join(child_sections))
    split = load_experiment(child)
    assert split.model_dump(exclude={"extends"}) == load_experiment(EXPERIMENT).model_dump(
        exclude={"extends"})


def test_effective_text_round_trips(tmp_path):
    write(tmp_path, "base.toml", BASE)
    child = write(tmp_path, "child.toml", 'extends = "base.toml"\n[pool]\nn_words = 5\n')
    experiment = load_experiment(child)
    text = effective_experiment_text(experiment)
    values = json.loads(text)
    assert values["model"]["batch_size"] == 32
    assert values["pool"]["n_words"] == 5
    assert values["extends"] == "base.toml"
    assert Experiment.model_validate(values) == experiment


def test_reference_page_documents_extends():
    from loop.schema_docs import render

    assert "| `extends` | str (optional) |" in render()
