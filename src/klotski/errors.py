"""Errors a user can fix: the CLI prints them without a traceback and exits with code 2.

Every class here is a KlotskiError, so one `except KlotskiError` catches them all; the
subclasses let callers (the server, batch jobs) tell kinds apart. docs/errors.md lists them
with an example message each.
"""


class KlotskiError(ValueError):
    """A user-facing error: bad input, a missing or corrupt file, a budget that cannot fit.

    The message names the problem and the fix. Internal bugs raise anything else.
    """


class CheckpointError(KlotskiError):
    """A checkpoint directory is missing files, corrupt, or disagrees with its config.json."""


class ConfigError(CheckpointError):
    """config.json holds a value the model cannot run with (a count out of range, a wrong type)."""


class UnsupportedModelError(KlotskiError):
    """config.json names an architecture (or a variant of one) this engine does not implement."""


class ParameterError(KlotskiError):
    """A request parameter (SamplingParams field, prompt token id) is of the wrong type or out of range.

    `field` names the parameter (e.g. "max_tokens"), so a front end can name its own flag or key."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class OffloadError(KlotskiError):
    """The offload directory is unusable (vanished, truncated, corrupt, full, locked): the run stops."""


class NumericalError(KlotskiError):
    """The model produced non-finite values (NaN or inf): tokens drawn from them would be garbage."""
