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


class OutputError(FFASynthError, OSError):
    """An output could not be written (disk full, no permission, a file where a folder should be) or
    must not be (it would land on an input); the message names the path. Also an OSError with the
    errno kept, so code that handles a failed write as an OSError still does."""

    def __init__(self, message: str, errno: int | None = None, strerror: str | None = None):
        super().__init__(errno, strerror)
        self.message = message

    def __str__(self) -> str:
        return self.message
