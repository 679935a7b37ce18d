"""The project's error types. Each message is one sentence a user can act on; the CLI prints it
as one line (no traceback) and exits non-zero."""


class FFASynthError(Exception):
    """Base class for every error ffasynth reports to a user."""


class ImageReadError(FFASynthError):
    """An image file could not be read; the message names the file and the cause."""

    def __init__(self, path, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{path}: {cause}")


class PairError(FFASynthError):
    """A folder or manifest of pairs is unusable (no layout detected, bad manifest, no pairs)."""


class ConfigError(FFASynthError):
    """A configuration key or value is wrong; the message names the key."""


class WeightsNotFoundError(FFASynthError):
    """Model weights are absent; the message says which file to put where."""
