"""Errors raised by stream acquisition."""


class StreamNotFoundError(RuntimeError):
    """No LSL stream with the requested name or type appeared within the timeout."""


class StreamLostError(RuntimeError):
    """A stream that was sending stopped sending."""


class EpochLostError(RuntimeError):
    """A trial's response window overlaps a gap in the stream, so it has no response.

    ``n_channels`` is the stream's channel count, for the row of NaN the trial is recorded with.
    """

    def __init__(self, message: str, n_channels: int) -> None:
        super().__init__(message)
        self.n_channels = n_channels


class ClockBaseError(RuntimeError):
    """A stream's time stamps are not on the LSL clock (for example Unix time)."""
