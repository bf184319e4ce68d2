"""Errors raised by the session layer: configuration, deadlines and session state."""


class ConfigError(ValueError):
    """An experiment or rig file that does not validate; the message lists every problem."""


class DeadlineMissedError(RuntimeError):
    """The controller repeatedly missed its onset deadlines."""


class SessionAbortedError(RuntimeError):
    """A session stopped before its schedule ended; the trials recorded so far are kept."""


class RunEndedError(SessionAbortedError):
    """The operator ended the run (the end key or Ctrl+C), or the display stopped."""


class ResumeError(RuntimeError):
    """A stopped session cannot be resumed as recorded. The message gives the reason and what to do."""
