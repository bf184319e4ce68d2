"""Check before a run that every sentence fits the window and that the font has all its glyphs.

Runs in the controller process before the first trial. The layout check needs an open PsychoPy
window, and the glyph check reads the font file that fontconfig picks, as PsychoPy's TextStim does
on Linux. Neither check changes the text, so the text shown is the text in the markers.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from loop.psychopy_presenter import TextSettings, make_text_stim

if TYPE_CHECKING:
    from psychopy.visual import Window

logger = logging.getLogger(__name__)

# Laid out once to measure the height of one line, so that a text's line count is its height over this.
LINE_PROBE_TEXT = "Hg"


class TextCheckError(ValueError):
    """Sentences that would not fit the window or that contain characters the font lacks.

    The message lists every offending sentence with its reason. ``problems`` contains the same
    pairs of (sentence, reason).
    """

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)
        lines = [f"{len(self.problems)} sentence(s) failed the check before the run:"]
        lines += [f"  {text!r}: {reason}" for text, reason in self.problems]
        lines.append("Shorten or reword these sentences, or change the font or text settings.")
        super().__init__("\n".join(lines))


def find_font_file(font_name: str) -> Path:
    """Find the file of the font family ``font_name`` that PsychoPy's TextStim would draw with.

    TextStim draws with pyglet, and on Linux pyglet 1.5 takes the font file from fontconfig. For an
    unknown family fontconfig returns a fallback font, which TextStim would draw silently, so that
    raises here.
    """
    if not sys.platform.startswith("linux"):
        # NOTE: pyglet uses Quartz on macOS and GDI+ or DirectWrite on Windows, and neither gives a
        # file path, so the glyph check there needs the font file passed in.
        raise RuntimeError(
            f"Finding the file of font {font_name!r} works only on Linux (fontconfig), "
            f"not on {sys.platform}. Pass the font file to check_texts_before_run as font_file."
        )

    # pyglet would open a hidden shadow window at import, which fails without a display.
    os.environ["PYGLET_SHADOW_WINDOW"] = "0"
    from pyglet.font.fontconfig import get_fontconfig

    match = get_fontconfig().find_font(font_name)
    matched_family = match.name if match else None
    if not match or not match.file or (matched_family or "").lower() != font_name.lower():
        raise FileNotFoundError(
            f"Font {font_name!r} is not installed, and fontconfig offers {matched_family!r} in its "
            "place, which PsychoPy would draw without a warning. Install the font (copy its files into "
            "~/.local/share/fonts and run fc-cache), or set the text font to a family that "
            "`fc-list : family` lists."
        )
    return Path(match.file)


def missing_glyphs(texts: Iterable[str], font_file: Path) -> dict[str, list[str]]:
    """Return, for each text with characters the font has no glyph for, those characters.

    A character counts as present when the font's cmap maps its code point. Whitespace is not
    checked, because the layout turns it into space or line breaks. Characters are listed once, in
    order of first appearance, and texts with every glyph present are left out.
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
        absent = [char for char in dict.fromkeys(text) if not char.isspace() and ord(char) not in cmap]
        if absent:
            missing[text] = absent
    return missing


def unfit_texts(
    window: Window,
    texts: Iterable[str],
    text_settings: TextSettings,
    max_lines: int | None,
    max_height_fraction: float,
) -> list[tuple[str, str]]:
    """Lay each text out in ``window`` and return those that would not fit, with the reason.

    A text does not fit when its bounding box is wider than the wrap width, when it is taller than
    ``max_height_fraction`` of the window height, or when it takes more than ``max_lines`` lines
    (None for no line limit). The text is laid out by a TextStim with the presenter's settings.
    """
    if max_lines is not None and max_lines < 1:
        raise ValueError(f"max_lines must be 1 or more, or None for no limit, got {max_lines!r}.")
    if not 0 < max_height_fraction <= 1:
        raise ValueError(
            f"max_height_fraction must be a fraction of the window height in (0, 1], "
            f"got {max_height_fraction!r}."
        )

    from psychopy.tools.monitorunittools import convertToPix

    stim = make_text_stim(window, text_settings, LINE_PROBE_TEXT)
    _, line_height_pix = stim.boundingBox
    wrap_width_pix = float(
        convertToPix(vertices=[text_settings.wrap_width, 0], pos=[0, 0], units=stim.units, win=window)[0]
    )
    max_height_pix = max_height_fraction * window.size[1]

    unfit: list[tuple[str, str]] = []
    for text in texts:
        stim.text = text
        # boundingBox is in pixels in PsychoPy 2026.2 whatever the units, as its docstring states.
        width_pix, height_pix = stim.boundingBox
        n_lines = round(height_pix / line_height_pix)

        reasons = []
        if width_pix > wrap_width_pix:
            reasons.append(
                f"It is {width_pix:.0f} px wide, more than the wrap width of {wrap_width_pix:.0f} px "
                f"({text_settings.wrap_width:g} {stim.units} units), so a word is longer than a line."
            )
        if height_pix > max_height_pix:
            reasons.append(
                f"It is {height_pix:.0f} px tall, more than {max_height_fraction:g} of the "
                f"{window.size[1]:.0f} px window height ({max_height_pix:.0f} px)."
            )
        if max_lines is not None and n_lines > max_lines:
            reasons.append(f"It takes {n_lines} lines, more than the maximum of {max_lines}.")
        if reasons:
            unfit.append((text, " ".join(reasons)))
    return unfit


def check_texts_before_run(
    window: Window,
    texts: Iterable[str],
    text_settings: TextSettings,
    max_lines: int | None = None,
    max_height_fraction: float = 1.0,
    font_file: Path | None = None,
) -> None:
    """Check all ``texts`` for missing glyphs and for fit, and raise one error listing every failure.

    ``font_file`` defaults to the file fontconfig finds for ``text_settings.font``. Raises
    :class:`TextCheckError` naming each offending text, and returns None when all pass.
    """
    texts = list(texts)
    if font_file is None:
        font_file = find_font_file(text_settings.font)

    # Reasons per text, in the order of ``texts``, so that each sentence is listed once.
    reasons: dict[str, list[str]] = {}
    for text, chars in missing_glyphs(texts, font_file).items():
        listed = ", ".join(f"{char!r} (U+{ord(char):04X})" for char in chars)
        reasons.setdefault(text, []).append(f"Font file {font_file.name} has no glyph for {listed}.")
    for text, reason in unfit_texts(window, texts, text_settings, max_lines, max_height_fraction):
        reasons.setdefault(text, []).append(reason)

    problems = [(text, " ".join(reasons[text])) for text in dict.fromkeys(texts) if text in reasons]
    if problems:
        raise TextCheckError(problems)
    logger.info("Checked %d sentences against font file %s and the window: all fit.", len(texts), font_file)
