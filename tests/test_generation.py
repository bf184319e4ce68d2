"""Tests of candidate-pool generation: sentence normalisation, word counts, pool files, sampling."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from synth.generation import (
    DEFAULT_PROMPTS,
    PoolGenerationError,
    SamplingCounts,
    count_words,
    dedup_key,
    example_sentence_keys,
    generate_sentences,
    normalise_sentence,
    sample_top_p,
    select_sentences,
    write_pool,
)

NORMALISED = [
    ("The cat sat on the mat.", "The cat sat on the mat."),
    ("  The cat   sat\ton the\nmat.  ", "The cat sat on the mat."),
    ("- The cat sat on the mat.", "The cat sat on the mat."),
    ("* Where did you park the car?", "Where did you park the car?"),
    ("• Watch out for that branch!", "Watch out for that branch!"),
    ("3. The rain stopped at noon.", "The rain stopped at noon."),
    ("(b) The rain stopped at noon.", "The rain stopped at noon."),
    ('"The rain stopped at noon."', "The rain stopped at noon."),
    ("“The rain stopped at noon.”", "The rain stopped at noon."),
    ("I don’t like cold soup.", "I don't like cold soup."),
    ("She wore a well-known brand.", "She wore a well-known brand."),
    ("The dogs' bowls were empty.", "The dogs' bowls were empty."),
    ("Yes, we can go tomorrow.", "Yes, we can go tomorrow."),
    ("He came; she left at once.", "He came; she left at once."),
    ("Zoë visited the old café.", "Zoë visited the old café."),
    ("Zoe\u0308 visited the old cafe\u0301.", "Zoë visited the old café."),  # NFC composes
    ("I saw it.", "I saw it."),
]

REJECTED = [
    "",
    "   ",
    ".",
    "the cat sat on the mat.",  # lower-case start
    "The cat sat on the mat",  # no end mark
    "The cat sat on the mat...",  # ellipsis
    "The cat sat on the mat?!",  # two end marks
    "The cat sat. It purred.",  # two sentences
    "Mr. Smith sat on the mat.",  # inner full stop
    "The 3 cats sat on mats.",  # digit
    "See www.example.com for details.",  # URL
    "See https://example.com today.",  # URL
    "The cat (a tabby) sat down.",  # brackets
    "The cat sat on the *mat*.",  # markup
    'He said "no" to me.',  # inner quotes
    "Note: the cat sat down.",  # colon
    "The cat sat on the the mat.",  # repeated word
    "Run, run, run away now!",  # repeated word across commas
    "THE CAT SAT ON THE MAT.",  # all capitals
    "The NASA rocket launched today.",  # all-capital word
    "The cat sat , on the mat.",  # detached comma
    "The cat sat on the mat,.",  # comma before the end mark
    "The cat -- sat on the mat.",  # detached dashes
    "The cat sat on the mat — again.",  # em dash
    "The cat sat on #mats.",  # symbol
    "The cat's--toy broke today.",  # double hyphen
    "- ",
]


@pytest.mark.parametrize(("text", "expected"), NORMALISED)
def test_normalise_sentence_keeps(text: str, expected: str) -> None:
    assert normalise_sentence(text) == expected


@pytest.mark.parametrize("text", REJECTED)
def test_normalise_sentence_rejects(text: str) -> None:
    assert normalise_sentence(text) is None


def test_normalise_sentence_idempotent() -> None:
    for text, expected in NORMALISED:
        assert normalise_sentence(expected) == expected, text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("The cat sat on the mat.", 6),
        ("I don't like well-known songs.", 5),
        ("Yes, we can go.", 4),
        ("  spaced   out  words ", 3),
        ("A - B", 2),  # a lone dash is not a word
        ("Hello!", 1),
    ],
)
def test_count_words(text: str, expected: int) -> None:
    assert count_words(text) == expected


def test_dedup_key_ignores_case_and_punctuation() -> None:
    assert dedup_key("The cat sat on the mat.") == "the cat sat on the mat"
    assert dedup_key("THE cat sat on the mat!") == dedup_key("The cat sat on the mat.")
    assert dedup_key("Yes, we can.") == "yes we can"
    assert dedup_key("I don't know.") == "i don't know"


def test_default_prompt_examples_have_six_words() -> None:
    keys = example_sentence_keys(DEFAULT_PROMPTS)
    assert len(keys) == 3 * len(DEFAULT_PROMPTS)
    for key in keys:
        assert count_words(key) == 6, key


def test_select_sentences_filters_and_counts() -> None:
    seen = {dedup_key("The bread smelled warm and sweet.")}
    counts = SamplingCounts()
    continuations = [
        " The soup was far too salty. It was",  # kept, cut after its first sentence
        " the soup was far too salty.",  # lower case: not well-formed
        " We ate the soup.",  # well-formed, four words
        " THE SOUP WAS FAR TOO SALTY.",  # all capitals
        " The soup was far too salty!",  # duplicate of the first
        " The bread smelled warm and sweet.",  # copy of a prompt example
        " Who burnt the rice this time?\n- Next",  # kept, cut at the newline
        " We waited for the bus...",  # trails off: the ellipsis is not cut to a full stop
    ]
    new_sentences = select_sentences(continuations, 6, seen, counts)
    assert new_sentences == ["The soup was far too salty.", "Who burnt the rice this time?"]
    assert counts.n_well_formed == 5
    assert counts.n_exact_length == 4
    assert dedup_key("Who burnt the rice this time?") in seen


def test_write_pool_round_trip(tmp_path) -> None:
    path = tmp_path / "pool.txt"
    sentences = ["The cat sat on the mat.", "Zoë visited the old café."]
    created = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    write_pool(path, sentences, {"model": "test-model", "settings": {"n_words": 6}}, created=created)

    assert path.read_text(encoding="utf-8") == "The cat sat on the mat.\nZoë visited the old café.\n"
    sidecar = json.loads((tmp_path / "pool.txt.json").read_text(encoding="utf-8"))
    assert sidecar["model"] == "test-model"
    assert sidecar["settings"] == {"n_words": 6}
    assert sidecar["n_sentences"] == 2
    assert sidecar["created"] == "2025-01-02T03:04:05+00:00"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.txt", "pool.txt.json"]


def test_write_pool_rejects_multiline(tmp_path) -> None:
    with pytest.raises(ValueError, match="single non-empty lines"):
        write_pool(tmp_path / "pool.txt", ["One line.\nTwo lines."], {})
    assert not (tmp_path / "pool.txt").exists()


@pytest.fixture(scope="module")
def gemma():
    from synth.models import load_causal_lm

    return load_causal_lm("embedded:gemma3-270m", device="cpu")


@pytest.mark.models
def test_generate_sentences_seeded(gemma) -> None:
    first = generate_sentences(gemma, 8, n_words=6, seed=123, batch_size=32)
    second = generate_sentences(gemma, 8, n_words=6, seed=123, batch_size=32)

    assert len(first) == 8
    assert first == second
    assert len({dedup_key(sentence) for sentence in first}) == 8
    for sentence in first:
        assert count_words(sentence) == 6, sentence
        assert normalise_sentence(sentence) == sentence


@pytest.mark.models
def test_generate_sentences_invalid_settings(gemma) -> None:
    with pytest.raises(ValueError, match="top_p"):
        generate_sentences(gemma, 8, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate_sentences(gemma, 8, temperature=0.0)
    with pytest.raises(ValueError, match="prompts"):
        generate_sentences(gemma, 8, prompts=[])


@pytest.mark.models
def test_generate_sentences_low_yield_raises(gemma) -> None:
    # No continuation has 40 words within the default 3 * 40 + 4 tokens budget before one batch ends.
    with pytest.raises(PoolGenerationError, match="Only 0 of 5 sentences"):
        generate_sentences(gemma, 5, n_words=40, prompts=DEFAULT_PROMPTS[:1], batch_size=8,
                           max_rows=8)


def test_sample_top_p_dominant_token() -> None:
    import torch

    logits = torch.full((4, 3000), -10.0)
    logits[:, 7] = 10.0  # about 0.997 of the mass
    generator = torch.Generator().manual_seed(0)
    tokens, cut_mass = sample_top_p(logits, 0.9, 1.0, generator, top_k=16)
    assert tokens.tolist() == [7, 7, 7, 7]
    assert cut_mass.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_sample_top_p_cut_nucleus() -> None:
    import torch

    # Uniform over 2000 tokens: a 0.9 nucleus needs 1800 tokens, so top_k=1000 cuts off 0.4 of it.
    logits = torch.zeros((2, 2000))
    generator = torch.Generator().manual_seed(0)
    tokens, cut_mass = sample_top_p(logits, 0.9, 1.0, generator, top_k=1000)
    assert cut_mass.tolist() == pytest.approx([0.4, 0.4], abs=1e-5)
    assert all(0 <= token < 2000 for token in tokens.tolist())


def test_sample_top_p_seeded() -> None:
    import torch

    logits = torch.randn((16, 5000), generator=torch.Generator().manual_seed(1))
    first, _ = sample_top_p(logits, 0.9, 0.7, torch.Generator().manual_seed(5))
    second, _ = sample_top_p(logits, 0.9, 0.7, torch.Generator().manual_seed(5))
    assert torch.equal(first, second)
