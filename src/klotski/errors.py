"""Errors a user can fix: the CLI prints them without a traceback and exits with code 2."""


class KlotskiError(ValueError):
    """A user-facing error: bad input, a missing or corrupt file, a budget that cannot fit.

    The message names the problem and the fix. Internal bugs raise anything else.
    """


class CheckpointError(KlotskiError):
    """A checkpoint directory is missing files, corrupt, or disagrees with its config.json."""


class UnsupportedModelError(KlotskiError):
    """config.json names an architecture this engine does not implement."""
