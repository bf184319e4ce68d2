"""Errors raised by stream acquisition."""


class StreamNotFoundError(RuntimeError):
    """No LSL stream with the requested name or type appeared within the timeout."""


class StreamLostError(RuntimeError):
    """A stream that was sending stopped sending."""
