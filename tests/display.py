"""The PsychoPy test window shared by the drawing tests: 800x600 pixels, 40 cm wide at 57 cm."""

from __future__ import annotations

import os

WIDTH_PIX, HEIGHT_PIX = 800, 600
MONITOR_WIDTH_CM, MONITOR_DISTANCE_CM = 40.0, 57.0


def open_degree_window(name: str):
    """Open a grey window in degrees on the current display, with its first back buffer cleared."""
    # pyglet would open a hidden shadow window at import, which fails without a display.
    os.environ["PYGLET_SHADOW_WINDOW"] = "0"
    from psychopy import monitors, visual

    monitor = monitors.Monitor(name, width=MONITOR_WIDTH_CM, distance=MONITOR_DISTANCE_CM,
                               autoLog=False)
    monitor.setSizePix([WIDTH_PIX, HEIGHT_PIX])
    window = visual.Window(size=[WIDTH_PIX, HEIGHT_PIX], color="grey", units="deg",
                           monitor=monitor, checkTiming=False, autoLog=False)
    # The first back buffer is undefined until a flip clears it.
    window.flip()
    return window
