"""Tests of the checks before a run: glyphs against DejaVu Sans, and layout in a real window under Xvfb.

DejaVu Sans is the font of these tests because Debian and Ubuntu install it with fontconfig.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from loop.psychopy_presenter import TextSettings, WindowSettings
from loop.text_checks import (
    TextCheckError,
    check_texts_before_run,
    find_font_file,
    missing_glyphs,
    unfit_texts,
)

FONT = "DejaVu Sans"
WINDOW = WindowSettings(size_pix=(800, 600), background_color="grey", units="height")
TEXT = TextSettings(font=FONT, height=0.05, wrap_width=0.8, color="white")

SHORT_SENTENCE = "The bridge held."
# One word of 60 letters, far wider than the 480 px wrap width at this text height.
LONG_WORD = "Pneumonoultramicroscopicsilicovolcanoconiosis" + "x" * 15
LONG_SENTENCE = (
    "The committee postponed its decision until the engineers could measure how the bridge "
    "responded to wind gusts over a whole winter."
)
# U+4E2D, a CJK ideograph, is not in DejaVu Sans 2.37's cmap (checked with fontTools). U+1F600 is.
CJK_SENTENCE = "The sign said 中 in red."

MISSING_GLYPH_CASES = [
    ("Plain ASCII, with digits 0-9 and (punctuation)!", {}),
    ("Café crème", {}),
    ("Smile \U0001f600 and a dash \u2014 with \u2019quotes\u2019", {}),
    ("Tabs\tand\nnewlines and a no-break\u00a0space", {}),
    (CJK_SENTENCE, {CJK_SENTENCE: ["中"]}),
    ("中中文 中", {"中中文 中": ["中", "文"]}),
    ("A brain \U0001f9e0 emoji", {"A brain \U0001f9e0 emoji": ["\U0001f9e0"]}),
    ("", {}),
]


@pytest.fixture(scope="module")
def dejavu_file() -> Path:
    return find_font_file(FONT)


@pytest.fixture(scope="module")
def window(xvfb_display: str) -> Iterator:
    # pyglet would open a hidden shadow window at import, as the presenter notes.
    os.environ["PYGLET_SHADOW_WINDOW"] = "0"
    from psychopy import visual

    window = visual.Window(
        size=list(WINDOW.size_pix),
        color=WINDOW.background_color,
        units=WINDOW.units,
        checkTiming=False,
        autoLog=False,
    )
    yield window
    window.close()


def test_find_font_file_dejavu(dejavu_file: Path) -> None:
    assert dejavu_file.name == "DejaVuSans.ttf"
    assert dejavu_file.is_file()


def test_find_font_file_unknown_font() -> None:
    with pytest.raises(FileNotFoundError, match="'No Such Font Family' is not installed"):
        find_font_file("No Such Font Family")


@pytest.mark.parametrize(("text", "expected"), MISSING_GLYPH_CASES)
def test_missing_glyphs_dejavu(dejavu_file: Path, text: str, expected: dict[str, list[str]]) -> None:
    assert missing_glyphs([text], dejavu_file) == expected


def test_missing_glyphs_several_texts(dejavu_file: Path) -> None:
    texts = ["Café crème", CJK_SENTENCE, "ASCII"]

    assert missing_glyphs(texts, dejavu_file) == {CJK_SENTENCE: ["中"]}


@pytest.mark.display
def test_unfit_texts_short_sentence_fits(window) -> None:
    assert (
        unfit_texts(window, [SHORT_SENTENCE, LONG_SENTENCE], TEXT, max_lines=5, max_height_fraction=0.5) == []
    )


@pytest.mark.display
def test_unfit_texts_long_word(window) -> None:
    unfit = unfit_texts(window, [SHORT_SENTENCE, LONG_WORD], TEXT, max_lines=None, max_height_fraction=1.0)

    assert [text for text, _ in unfit] == [LONG_WORD]
    reason = unfit[0][1]
    assert "more than the wrap width of 480 px" in reason
    assert "tall" not in reason


@pytest.mark.display
def test_unfit_texts_too_many_lines(window) -> None:
    # LONG_SENTENCE wraps onto 5 lines of 35 px at a 480 px wrap width (measured under Xvfb).
    unfit = unfit_texts(window, [LONG_SENTENCE], TEXT, max_lines=2, max_height_fraction=1.0)

    assert [text for text, _ in unfit] == [LONG_SENTENCE]
    assert "It takes 5 lines, more than the maximum of 2." in unfit[0][1]


@pytest.mark.display
def test_unfit_texts_too_tall(window) -> None:
    # Five lines are 175 px, more than a tenth of the 600 px window.
    unfit = unfit_texts(
        window, [SHORT_SENTENCE, LONG_SENTENCE], TEXT, max_lines=None, max_height_fraction=0.1
    )

    assert [text for text, _ in unfit] == [LONG_SENTENCE]
    assert "more than 0.1 of the 600 px window height (60 px)" in unfit[0][1]


@pytest.mark.display
def test_unfit_texts_invalid_limits(window) -> None:
    with pytest.raises(ValueError, match="max_lines must be 1 or more"):
        unfit_texts(window, [SHORT_SENTENCE], TEXT, max_lines=0, max_height_fraction=1.0)
    with pytest.raises(ValueError, match="max_height_fraction must be"):
        unfit_texts(window, [SHORT_SENTENCE], TEXT, max_lines=None, max_height_fraction=1.5)


@pytest.mark.display
def test_check_texts_before_run_passes(window) -> None:
    assert check_texts_before_run(window, [SHORT_SENTENCE, "Café crème"], TEXT, max_lines=4) is None


@pytest.mark.display
def test_check_texts_before_run_lists_all(window) -> None:
    hidden_space = "Zero\u200bwidth space, too long: " + LONG_WORD
    texts = [SHORT_SENTENCE, LONG_WORD, CJK_SENTENCE, hidden_space]

    with pytest.raises(TextCheckError) as caught:
        check_texts_before_run(window, texts, TEXT, max_lines=5)

    error = caught.value
    message = str(error)
    assert [text for text, _ in error.problems] == [LONG_WORD, CJK_SENTENCE, hidden_space]
    assert message.startswith("3 sentence(s) failed the check before the run:")
    assert f"{CJK_SENTENCE!r}: Font file DejaVuSans.ttf has no glyph for '中' (U+4E2D)." in message
    assert f"{LONG_WORD!r}: It is " in message
    # repr shows the zero-width space, so the reader can find it in the sentence.
    assert "'Zero\\u200bwidth space" in message
    assert SHORT_SENTENCE not in message


@pytest.mark.display
def test_check_texts_before_run_both_reasons(window) -> None:
    text = "中" + LONG_WORD

    with pytest.raises(TextCheckError) as caught:
        check_texts_before_run(window, [text], TEXT)

    assert len(caught.value.problems) == 1
    reason = caught.value.problems[0][1]
    assert reason.startswith("Font file DejaVuSans.ttf has no glyph for '中' (U+4E2D). It is ")
    assert "more than the wrap width of 480 px" in reason
