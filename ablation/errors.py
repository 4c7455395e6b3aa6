"""Error types and exit codes: every user-facing failure is one of these, printed as one line with its exit code."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

# A command's exit codes (a DataError's, ConfigError's ...: 2; a full disk: 75).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4


class AblationError(Exception):
    """Base class: a problem the user can fix; the CLI prints it as one line and exits non-zero."""

    exit_code = 2


class ConfigError(AblationError):
    """A run config or sweep spec is malformed: unknown key, wrong type or impossible value."""


class DataError(AblationError):
    """A dataset is missing, malformed or unreadable."""


class NormError(AblationError):
    """A norm name, import path or parameter cannot be resolved."""


class ConfigWarning(UserWarning):
    """A config value that is valid but has no effect (e.g. norm.batch on a norm that normalizes each image alone)."""


class DiskFullError(AblationError):
    """The disk (or quota) filled up while writing the run folder: the run stopped, its last checkpoint intact."""

    exit_code = 75  # EX_TEMPFAIL: try again once there is space; not a failure of the run


def last_line(e: BaseException) -> str:
    """The last non-empty line of an exception's message ("" if none): a DataLoader worker's error arrives wrapped in a traceback."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def one_line(e: BaseException) -> str:
    """An exception as one line: its message's last line, else its type."""
    return last_line(e) or type(e).__name__


def exit_status(command: Callable[[], int]) -> int:
    """Run a command, turning what it raises into one line on stderr and its exit code.

    The `ablation` command and the local executor's forked runs report through here, so a run's
    log ends the same way whichever started it.
    """
    try:
        return command()
    except AblationError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into `head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the run folder already says 'failed' with the reason
        print(f"error: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
