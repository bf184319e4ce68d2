"""Check before a run that every sentence fits the window and that the font has all its glyphs.

Runs in the controller process before the first trial. The layout check needs an open PsychoPy
window with a monitor, because the text is laid out in degrees by the stimuli the presenter draws
(:mod:`loop.visuals`). The glyph check reads the font file those stimuli draw with. Neither check
changes the text, so the text shown is the text in the markers.
"""

from __future__ import annotations

import logging
import math
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from loop.visuals import (
    PRESENTATION_MODES,
    PresentationMode,
    TextLook,
    find_font_file,
    font_path,
    join_arabic_letters,
    make_text_stim,
    paragraph_direction,
    set_text,
    visual_order,
)

if TYPE_CHECKING:
    from psychopy.visual import TextStim, Window

__all__ = [
    "TextCheckError",
    "check_texts_before_run",
    "find_font_file",
    "missing_glyphs",
    "unfit_rsvp_texts",
    "unfit_texts",
]

logger = logging.getLogger(__name__)

# Laid out once to measure the height of one line, so that a text's line count is its height over this.
LINE_PROBE_TEXT = "Hg"

# Slack for the RSVP duration check, so that 3 words of 0.1 s fit a 0.3 s stimulus despite rounding.
DURATION_TOLERANCE_S = 1e-9


class TextCheckError(ValueError):
    """Sentences that would not fit the window or that contain characters the font lacks.

    The message lists every offending sentence with its reason. ``problems`` contains the same
    pairs of (sentence, reason).
    """

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)
        lines = [f"{len(self.problems)} sentence(s) failed the check before the run:"]
        lines += [f"  {text!r}: {reason}" for text, reason in self.problems]
        lines.append(
            "Shorten or reword these sentences, or change the font, the text settings or the word duration."
        )
        super().__init__("\n".join(lines))


def missing_glyphs(texts: Iterable[str], font_file: Path) -> dict[str, list[str]]:
    """Return, for each text with characters the font has no glyph for, those characters.

    The characters checked are those drawn, so Arabic letters are checked in the joined forms that
    the presenter draws them in. A character counts as present when the font's cmap maps its code
    point. Whitespace is not checked, because the layout turns it into space or line breaks.
    Characters are listed once, in order of first appearance, and texts with every glyph present are
    left out.
    """
    from fontTools.ttLib import TTFont

    with TTFont(font_file, lazy=True) as font:
        cmap = font.getBestCmap()
    if cmap is None:
        raise ValueError(
            f"Font file {str(font_file)!r} has no Unicode cmap table, so its glyphs cannot be "
            "checked. Use a TrueType or OpenType font with a Unicode cmap."
        )

    missing: dict[str, list[str]] = {}
    for text in texts:
        paragraphs = text.split("\n")
        drawn = "".join(visual_order(paragraph, paragraph_direction(paragraph)) for paragraph in paragraphs)
        drawn_chars = set(drawn)
        # Listed in reading order, with any mirrored bracket that only the drawn text has at the end.
        in_reading_order = dict.fromkeys(join_arabic_letters(text) + drawn)
        absent = [
            char
            for char in in_reading_order
            if char in drawn_chars and not char.isspace() and ord(char) not in cmap
        ]
        if absent:
            missing[text] = absent
    return missing


def unfit_texts(
    window: Window, texts: Iterable[str], look: TextLook, max_height_fraction: float = 1.0
) -> list[tuple[str, str]]:
    """Lay each whole sentence out in ``window`` and return those that would not fit, with the reason.

    A sentence does not fit when it is empty, when it is wider than the wrap width (a word longer
    than a line), when it is taller than ``max_height_fraction`` of the window height, or when it
    takes more than ``look.max_lines`` lines. It is laid out by the stimulus the presenter draws.
    """
    _check_height_fraction(max_height_fraction)
    layout = _Layout(window, look, max_height_fraction)

    unfit: list[tuple[str, str]] = []
    for text in texts:
        if not text.strip():
            unfit.append((text, "It is empty or only whitespace, so nothing would be shown."))
            continue
        n_lines, reasons = layout.measure(text, "It", "so a word is longer than a line")
        if look.max_lines is not None and n_lines > look.max_lines:
            reasons.append(f"It takes {n_lines} lines, more than the maximum of {look.max_lines}.")
        if reasons:
            unfit.append((text, " ".join(reasons)))
    return unfit


def unfit_rsvp_texts(
    window: Window,
    texts: Iterable[str],
    look: TextLook,
    word_duration_s: float,
    stimulus_duration_s: float,
    max_height_fraction: float = 1.0,
) -> list[tuple[str, str]]:
    """Return the sentences that RSVP could not show one word at a time, with the reason.

    A sentence does not fit when it has no words, or when its words take longer than
    ``stimulus_duration_s`` at ``word_duration_s`` each. It does not fit either when one of its words
    is wider than the wrap width, takes more than one line, or is taller than ``max_height_fraction``
    of the window.
    """
    _check_height_fraction(max_height_fraction)
    for name, value in (("word_duration_s", word_duration_s), ("stimulus_duration_s", stimulus_duration_s)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}.")
    layout = _Layout(window, look, max_height_fraction)

    unfit: list[tuple[str, str]] = []
    for text in texts:
        words = text.split()
        if not words:
            unfit.append((text, "It has no words, so nothing would be shown."))
            continue
        reasons = []
        for word in dict.fromkeys(words):
            n_lines, word_reasons = layout.measure(word, f"The word {word!r}", "so it does not fit on a line")
            reasons += word_reasons
            if n_lines > 1:
                reasons.append(f"The word {word!r} takes {n_lines} lines instead of one.")
        words_duration_s = len(words) * word_duration_s
        if words_duration_s > stimulus_duration_s + DURATION_TOLERANCE_S:
            reasons.append(
                f"Its {len(words)} words take {words_duration_s:g} s at {word_duration_s:g} s each, "
                f"longer than the stimulus duration of {stimulus_duration_s:g} s."
            )
        if reasons:
            unfit.append((text, " ".join(reasons)))
    return unfit


def check_texts_before_run(
    window: Window,
    texts: Iterable[str],
    look: TextLook,
    mode: PresentationMode = "sentence",
    word_duration_s: float | None = None,
    stimulus_duration_s: float | None = None,
    max_height_fraction: float = 1.0,
) -> None:
    """Check all ``texts`` for missing glyphs and for fit, and raise one error listing every failure.

    Glyphs are checked against the file of :func:`loop.visuals.font_path`. ``mode`` is "sentence"
    (the whole text at once) or "rsvp" (one word at a time), which needs ``word_duration_s`` and
    ``stimulus_duration_s``. Raises :class:`TextCheckError` naming each offending text, and returns
    None when all pass.
    """
    if mode not in PRESENTATION_MODES:
        raise ValueError(f"mode must be one of {', '.join(PRESENTATION_MODES)}, got {mode!r}.")
    if mode == "rsvp" and (word_duration_s is None or stimulus_duration_s is None):
        raise ValueError(
            "mode 'rsvp' needs word_duration_s and stimulus_duration_s, got "
            f"{word_duration_s!r} and {stimulus_duration_s!r}."
        )
    texts = list(texts)
    font_file = font_path(look)

    # Reasons per text, in the order of ``texts``, so that each sentence is listed once.
    reasons: dict[str, list[str]] = {}
    for text, chars in missing_glyphs(texts, font_file).items():
        listed = ", ".join(_describe_character(char) for char in chars)
        reasons.setdefault(text, []).append(f"Font file {font_file.name} has no glyph for {listed}.")
    if mode == "sentence":
        unfit = unfit_texts(window, texts, look, max_height_fraction)
    else:
        unfit = unfit_rsvp_texts(
            window, texts, look, word_duration_s, stimulus_duration_s, max_height_fraction
        )
    for text, reason in unfit:
        reasons.setdefault(text, []).append(reason)

    problems = [(text, " ".join(reasons[text])) for text in dict.fromkeys(texts) if text in reasons]
    if problems:
        raise TextCheckError(problems)
    logger.info(
        "Checked %d sentences (%s mode) against font file %s and the window: all fit.",
        len(texts),
        mode,
        font_file,
    )


class _Layout:
    """One reused text stimulus that measures texts as the presenter will draw them, in pixels."""

    def __init__(self, window: Window, look: TextLook, max_height_fraction: float) -> None:
        from psychopy.tools.monitorunittools import deg2pix

        self._stim: TextStim = make_text_stim(window, look, LINE_PROBE_TEXT)
        _, self._line_height_pix = self._stim.boundingBox
        self._look = look
        self._wrap_width_pix = float(deg2pix(look.wrap_width_deg, window.monitor))
        self._window_height_pix = int(window.size[1])
        self._max_height_fraction = max_height_fraction
        self._max_height_pix = max_height_fraction * self._window_height_pix

    def measure(self, text: str, subject: str, too_wide_consequence: str) -> tuple[int, list[str]]:
        """Lay ``text`` out and return its number of lines and why it is too wide or too tall.

        Each reason starts with ``subject``, and the width reason ends with ``too_wide_consequence``.
        """
        set_text(self._stim, text)
        # boundingBox is in pixels in PsychoPy 2026.2 whatever the units, as its docstring states.
        width_pix, height_pix = self._stim.boundingBox
        n_lines = round(height_pix / self._line_height_pix)

        reasons = []
        if width_pix > self._wrap_width_pix:
            reasons.append(
                f"{subject} is {width_pix:.0f} px wide, more than the wrap width of "
                f"{self._wrap_width_pix:.0f} px ({self._look.wrap_width_deg:g} deg), {too_wide_consequence}."
            )
        if height_pix > self._max_height_pix:
            reasons.append(
                f"{subject} is {height_pix:.0f} px tall, more than {self._max_height_fraction:g} of the "
                f"{self._window_height_pix} px window height ({self._max_height_pix:.0f} px)."
            )
        return n_lines, reasons


def _check_height_fraction(max_height_fraction: float) -> None:
    if not 0 < max_height_fraction <= 1:
        raise ValueError(
            f"max_height_fraction must be a fraction of the window height in (0, 1], "
            f"got {max_height_fraction!r}."
        )


def _describe_character(char: str) -> str:
    """Describe a character for a message, as "'中' (U+4E2D CJK UNIFIED IDEOGRAPH-4E2D)"."""
    name = unicodedata.name(char, "")
    return f"{char!r} (U+{ord(char):04X}{' ' + name if name else ''})"
