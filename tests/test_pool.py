"""Candidate pools read from text and CSV corpus files."""

from __future__ import annotations

import pytest

from synth.pool import PoolFileError, clean_text, load_pool_file, stimulus_id

SENTENCES = [f"Sentence number {word} is here." for word in
             ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")]


def test_text_file_dedupes_and_normalises(tmp_path):
    path = tmp_path / "pool.txt"
    lines = ["# a comment line", *SENTENCES, "  sentence number ONE   is here. ",
             "Cafe\u0301 au lait is fine.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    pool = load_pool_file(path)
    assert pool.texts == [*SENTENCES, "Caf\u00e9 au lait is fine."]
    assert pool.ids[0] == stimulus_id(SENTENCES[0])
    assert len(set(pool.ids)) == len(pool)


def test_word_count_filter(tmp_path):
    path = tmp_path / "pool.txt"
    path.write_text("\n".join([*SENTENCES, "Too short.", "Far too many words in this one."]))
    pool = load_pool_file(path, n_words=5)
    assert pool.texts == SENTENCES


def test_csv_column(tmp_path):
    path = tmp_path / "pool.csv"
    rows = ["id,sentence"] + [f'{i},"{text}"' for i, text in enumerate(SENTENCES)]
    path.write_text("\n".join(rows), encoding="utf-8")
    assert load_pool_file(path).texts == SENTENCES


def test_csv_missing_column_named(tmp_path):
    path = tmp_path / "pool.csv"
    path.write_text("id,text\n1,Hello there.\n", encoding="utf-8")
    with pytest.raises(PoolFileError, match=r"no column 'sentence' in the header \['id', 'text'\]"):
        load_pool_file(path)


def test_invalid_utf8_position(tmp_path):
    path = tmp_path / "pool.txt"
    path.write_bytes("\n".join(SENTENCES).encode() + b"\nCaf\xe9 noir.\n")
    offset = len("\n".join(SENTENCES).encode()) + 4
    with pytest.raises(PoolFileError, match=rf"not valid UTF-8 at byte {offset} \(line 11"):
        load_pool_file(path)


def test_too_few_sentences(tmp_path):
    path = tmp_path / "pool.txt"
    path.write_text("\n".join(SENTENCES[:3]))
    with pytest.raises(PoolFileError, match="only 3 usable sentences; a pool needs at least 10"):
        load_pool_file(path)


def test_clean_text_collapses_whitespace():
    assert clean_text("  A\tb \n c  ") == "A b c"
