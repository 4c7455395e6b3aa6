"""Error types: every user-facing failure is one of these, printed as one line by the CLI."""


class AblationError(Exception):
    """Base class: a problem the user can fix; the CLI prints it as one line and exits non-zero."""

    exit_code = 2


class ConfigError(AblationError):
    """A run config or sweep spec is malformed: unknown key, wrong type or impossible value."""


class DataError(AblationError):
    """A dataset is missing, malformed or unreadable."""


class NormError(AblationError):
    """A norm name, import path or parameter cannot be resolved."""


class DiskFullError(AblationError):
    """The disk (or quota) filled up while writing the run folder: the run stopped, its last checkpoint intact."""

    exit_code = 75  # EX_TEMPFAIL: try again once there is space; not a failure of the run


def last_line(e: BaseException) -> str:
    """The last non-empty line of an exception's message ("" if none): a DataLoader worker's error arrives wrapped in a traceback."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else ""
