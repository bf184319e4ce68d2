"""Tests of the checks before a run: glyphs against real font files, and layout in a real window under Xvfb.

DejaVu Sans is found with fontconfig (Debian and Ubuntu install it) and has Hebrew and Arabic.
PsychoPy ships Noto Sans, which has no Hebrew, Arabic or CJK letters. Line counts are checked against the
lines a screenshot of the drawn text shows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from loop.text_checks import (
    TextCheckError,
    check_texts_before_run,
    find_font_file,
    missing_glyphs,
    unfit_rsvp_texts,
    unfit_texts,
)
from loop.visuals import TextLook, font_path, make_text_stim
from tests.display import (
    open_degree_window,
)

DEJAVU = TextLook(font="DejaVu Sans", height_deg=1.5, wrap_width_deg=24.0, max_lines=None)
NOTO = TextLook(height_deg=1.5, wrap_width_deg=24.0, max_lines=None)
# 24 deg at 57 cm from a 40 cm wide, 800 px screen.
WRAP_WIDTH_PIX_TEXT = "478 px"

SHORT_SENTENCE = "The bridge held."
# One word of 60 letters, far wider than the wrap width at this letter height.
LONG_WORD = "Pneumonoultramicroscopicsilicovolcanoconiosis" + "x" * 15
LONG_SENTENCE = (
    "The committee postponed its decision until the engineers could measure how the bridge "
    "responded to wind gusts over a whole winter."
)
HEBREW_SENTENCE = (
    "\u05d4\u05d5\u05d5\u05e2\u05d3\u05d4 \u05d3\u05d7\u05ea\u05d4 \u05d0\u05ea "
    "\u05d4\u05d4\u05d7\u05dc\u05d8\u05d4 \u05e2\u05d3 "
    "\u05e9\u05d4\u05de\u05d4\u05e0\u05d3\u05e1\u05d9\u05dd "
    "\u05d9\u05de\u05d3\u05d3\u05d5 \u05d0\u05ea \u05ea\u05d2\u05d5\u05d1\u05ea "
    "\u05d4\u05d2\u05e9\u05e8 \u05dc\u05e8\u05d5\u05d7 \u05d1\u05de\u05e9\u05da "
    "\u05d7\u05d5\u05e8\u05e3 \u05e9\u05dc\u05dd \u05d5\u05e2\u05d5\u05d3 \u05d7\u05d5\u05e8\u05e3."
)
# U+4E2D, a CJK ideograph, is in neither DejaVu Sans 2.37 nor PsychoPy's Noto Sans (checked with fontTools).
CJK_SENTENCE = "The sign said 中 in red."
CJK_GLYPH = "'中' (U+4E2D CJK UNIFIED IDEOGRAPH-4E2D)"
SALAM = "\u0633\u0644\u0627\u0645"  # Arabic "salam": seen, lam, alef, meem

MISSING_GLYPH_CASES_DEJAVU = [
    ("Plain ASCII, with digits 0-9 and (punctuation)!", {}),
    ("Café crème", {}),
    ("Smile \U0001f600 and a dash \u2014 with \u2019quotes\u2019", {}),
    ("Tabs\tand\nnewlines and a no-break\u00a0space", {}),
    (HEBREW_SENTENCE, {}),
    (SALAM + " (" + SALAM + ")", {}),
    (CJK_SENTENCE, {CJK_SENTENCE: ["中"]}),
    ("中中文 中", {"中中文 中": ["中", "文"]}),
    ("A brain \U0001f9e0 emoji", {"A brain \U0001f9e0 emoji": ["\U0001f9e0"]}),
    ("", {}),
]


@pytest.fixture(scope="module")
def window(xvfb_display: str) -> Iterator:
    window = open_degree_window("test-text-checks")
    yield window
    window.close()


def count_drawn_lines(window, look: TextLook, text: str) -> int:
    """Draw ``text`` and count the bands of rows with ink in the back buffer."""
    make_text_stim(window, look, text).draw()
    image = np.asarray(window.getMovieFrame(buffer="back"), dtype=np.int16)[..., :3]
    window.movieFrames.clear()
    window.flip()
    rows_with_ink = (np.abs(image - 128).max(axis=-1) > 60).any(axis=1).astype(int)
    return int((np.diff(np.concatenate([[0], rows_with_ink])) == 1).sum())


@pytest.fixture(scope="module")
def dejavu_file() -> Path:
    return find_font_file("DejaVu Sans")


# Glyphs ---------------------------------------------------------------------------------------------------


def test_find_font_file_dejavu(dejavu_file: Path) -> None:
    assert dejavu_file.name == "DejaVuSans.ttf"
    assert dejavu_file.is_file()
    assert font_path(DEJAVU) == dejavu_file


def test_find_font_file_unknown_font() -> None:
    with pytest.raises(FileNotFoundError, match="'No Such Font Family' is not installed"):
        find_font_file("No Such Font Family")


@pytest.mark.parametrize(("text", "expected"), MISSING_GLYPH_CASES_DEJAVU)
def test_missing_glyphs_dejavu(dejavu_file: Path, text: str, expected: dict[str, list[str]]) -> None:
    assert missing_glyphs([text], dejavu_file) == expected


def test_missing_glyphs_several_texts(dejavu_file: Path) -> None:
    texts = ["Café crème", CJK_SENTENCE, "ASCII"]

    assert missing_glyphs(texts, dejavu_file) == {CJK_SENTENCE: ["中"]}


def test_missing_glyphs_hebrew_in_reading_order() -> None:
    shalom = "\u05e9\u05dc\u05d5\u05dd"

    assert missing_glyphs([shalom + " " + shalom], font_path(NOTO)) == {shalom + " " + shalom: list(shalom)}


def test_missing_glyphs_arabic_joined_forms() -> None:
    # pyglet draws the joined presentation forms, so those are the glyphs the font must have.
    missing = missing_glyphs([SALAM], font_path(NOTO))

    assert missing == {SALAM: ["\ufeb3", "\ufefc", "\ufee1"]}


# Sentence layout ------------------------------------------------------------------------------------------


@pytest.mark.display
def test_unfit_texts_short_sentences_fit(window) -> None:
    assert unfit_texts(window, [SHORT_SENTENCE, LONG_SENTENCE, HEBREW_SENTENCE], DEJAVU, 0.9) == []


@pytest.mark.display
def test_unfit_texts_long_word(window) -> None:
    unfit = unfit_texts(window, [SHORT_SENTENCE, LONG_WORD], DEJAVU)

    assert [text for text, _ in unfit] == [LONG_WORD]
    reason = unfit[0][1]
    assert f"wrap width of {WRAP_WIDTH_PIX_TEXT} (24 deg), so a word is longer than a line." in reason
    assert "tall" not in reason


@pytest.mark.display
@pytest.mark.parametrize("text", [LONG_SENTENCE, HEBREW_SENTENCE])
def test_unfit_texts_too_many_lines(window, text: str) -> None:
    n_lines = count_drawn_lines(window, DEJAVU, text)
    assert n_lines >= 3, "the sentence must wrap for this test"
    look = TextLook(font="DejaVu Sans", height_deg=1.5, wrap_width_deg=24.0, max_lines=n_lines - 1)

    unfit = unfit_texts(window, [text], look)

    assert [unfit_text for unfit_text, _ in unfit] == [text]
    assert f"It takes {n_lines} lines, more than the maximum of {n_lines - 1}." in unfit[0][1]
    assert unfit_texts(window, [text], TextLook(font="DejaVu Sans", height_deg=1.5, max_lines=n_lines)) == []


@pytest.mark.display
def test_unfit_texts_too_tall(window) -> None:
    # LONG_SENTENCE takes several lines of about 35 px, more than a tenth of the 600 px window.
    unfit = unfit_texts(window, [SHORT_SENTENCE, LONG_SENTENCE], DEJAVU, max_height_fraction=0.1)

    assert [text for text, _ in unfit] == [LONG_SENTENCE]
    assert "more than 0.1 of the 600 px window height (60 px)" in unfit[0][1]


@pytest.mark.display
def test_unfit_texts_empty(window) -> None:
    unfit = unfit_texts(window, ["", "  \t"], DEJAVU)

    assert unfit == [
        ("", "It is empty or only whitespace, so nothing would be shown."),
        ("  \t", "It is empty or only whitespace, so nothing would be shown."),
    ]


@pytest.mark.display
def test_unfit_texts_invalid_fraction(window) -> None:
    with pytest.raises(ValueError, match="max_height_fraction must be a fraction of the window height"):
        unfit_texts(window, [SHORT_SENTENCE], DEJAVU, max_height_fraction=1.5)


# RSVP layout and timing -----------------------------------------------------------------------------------


@pytest.mark.display
def test_unfit_rsvp_texts_fit(window) -> None:
    # Three words of 0.1 s fill a 0.3 s stimulus exactly, although 3 * 0.1 > 0.3 in floats.
    assert 3 * 0.1 > 0.3

    assert unfit_rsvp_texts(window, [LONG_SENTENCE, HEBREW_SENTENCE], DEJAVU, 0.1, 3.0) == []
    assert unfit_rsvp_texts(window, ["one two three"], DEJAVU, 0.1, 0.3) == []


@pytest.mark.display
def test_unfit_rsvp_texts_long_word(window) -> None:
    text = f"A {LONG_WORD} here"

    unfit = unfit_rsvp_texts(window, [SHORT_SENTENCE, text], DEJAVU, 0.2, 5.0)

    assert [unfit_text for unfit_text, _ in unfit] == [text]
    reason = unfit[0][1]
    assert reason.startswith(f"The word {LONG_WORD!r} is ")
    assert f"wrap width of {WRAP_WIDTH_PIX_TEXT} (24 deg), so it does not fit on a line." in reason


@pytest.mark.display
def test_unfit_rsvp_texts_too_long_in_time(window) -> None:
    unfit = unfit_rsvp_texts(window, ["one two three four five", SHORT_SENTENCE], DEJAVU, 0.3, 1.0)

    assert unfit == [
        (
            "one two three four five",
            "Its 5 words take 1.5 s at 0.3 s each, longer than the stimulus duration of 1 s.",
        )
    ]


@pytest.mark.display
def test_unfit_rsvp_texts_no_words_and_invalid(window) -> None:
    unfit = unfit_rsvp_texts(window, [" "], DEJAVU, 0.2, 1.0)

    assert unfit == [(" ", "It has no words, so nothing would be shown.")]
    with pytest.raises(ValueError, match="word_duration_s must be a positive number of seconds, got 0"):
        unfit_rsvp_texts(window, [SHORT_SENTENCE], DEJAVU, 0, 1.0)
    with pytest.raises(ValueError, match="stimulus_duration_s must be a positive number of seconds, got nan"):
        unfit_rsvp_texts(window, [SHORT_SENTENCE], DEJAVU, 0.2, float("nan"))


# The whole check ------------------------------------------------------------------------------------------


@pytest.mark.display
def test_check_texts_before_run_passes(window) -> None:
    texts = [SHORT_SENTENCE, "Café crème", HEBREW_SENTENCE, SALAM]

    assert check_texts_before_run(window, texts, DEJAVU) is None
    assert (
        check_texts_before_run(window, texts, DEJAVU, "rsvp", word_duration_s=0.2, stimulus_duration_s=4.0)
        is None
    )


@pytest.mark.display
def test_check_texts_before_run_lists_all(window) -> None:
    hidden_space = "Zero\u200bwidth space, too long: " + LONG_WORD
    texts = [SHORT_SENTENCE, LONG_WORD, CJK_SENTENCE, hidden_space]

    with pytest.raises(TextCheckError) as caught:
        check_texts_before_run(window, texts, DEJAVU)

    error = caught.value
    message = str(error)
    assert [text for text, _ in error.problems] == [LONG_WORD, CJK_SENTENCE, hidden_space]
    assert message.startswith("3 sentence(s) failed the check before the run:")
    assert f"{CJK_SENTENCE!r}: Font file DejaVuSans.ttf has no glyph for {CJK_GLYPH}." in message
    assert f"{LONG_WORD!r}: It is " in message
    # repr shows the zero-width space, so the reader can find it in the sentence.
    assert "'Zero\\u200bwidth space" in message
    assert SHORT_SENTENCE not in message


@pytest.mark.display
def test_check_texts_before_run_cjk_with_noto(window) -> None:
    with pytest.raises(TextCheckError) as caught:
        check_texts_before_run(window, [SHORT_SENTENCE, CJK_SENTENCE], NOTO)

    assert caught.value.problems == [
        (CJK_SENTENCE, f"Font file NotoSans-Regular.ttf has no glyph for {CJK_GLYPH}.")
    ]


@pytest.mark.display
def test_check_texts_before_run_both_reasons(window) -> None:
    text = "中" + LONG_WORD

    with pytest.raises(TextCheckError) as caught:
        check_texts_before_run(window, [text], DEJAVU)

    assert len(caught.value.problems) == 1
    reason = caught.value.problems[0][1]
    assert reason.startswith(f"Font file DejaVuSans.ttf has no glyph for {CJK_GLYPH}. It is ")
    assert f"more than the wrap width of {WRAP_WIDTH_PIX_TEXT}" in reason


@pytest.mark.display
def test_check_texts_before_run_rsvp(window) -> None:
    texts = [SHORT_SENTENCE, "one two three four five six", CJK_SENTENCE]

    with pytest.raises(TextCheckError) as caught:
        check_texts_before_run(window, texts, DEJAVU, "rsvp", word_duration_s=0.25, stimulus_duration_s=1.0)

    problems = dict(caught.value.problems)
    assert list(problems) == ["one two three four five six", CJK_SENTENCE]
    assert problems["one two three four five six"] == (
        "Its 6 words take 1.5 s at 0.25 s each, longer than the stimulus duration of 1 s."
    )
    assert problems[CJK_SENTENCE] == (
        f"Font file DejaVuSans.ttf has no glyph for {CJK_GLYPH}. "
        "Its 6 words take 1.5 s at 0.25 s each, longer than the stimulus duration of 1 s."
    )


@pytest.mark.display
def test_check_texts_before_run_invalid_arguments(window) -> None:
    with pytest.raises(ValueError, match="mode 'rsvp' needs word_duration_s and stimulus_duration_s"):
        check_texts_before_run(window, [SHORT_SENTENCE], DEJAVU, "rsvp", word_duration_s=0.2)
    with pytest.raises(ValueError, match="mode must be one of sentence, rsvp, got 'scroll'"):
        check_texts_before_run(window, [SHORT_SENTENCE], DEJAVU, "scroll")
