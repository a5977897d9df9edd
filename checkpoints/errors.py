"""The one error type checkpoint loading raises, so entry points can print it as a single line."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or describes something meshserve cannot load; the message names the fix."""
