"""The errors rslad-edge raises for things a user can fix.

The CLI turns any :class:`RsladEdgeError` into one red line on stderr and its ``exit_code`` (1; 2 for a
:class:`UsageError`), so every message must say what is wrong (naming the file or flag at fault) and what to do
about it. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RsladEdgeError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""

    exit_code = 1


class ConfigError(RsladEdgeError):
    """An option or config value is invalid (bad eps, unknown name, inconsistent settings)."""


class UsageError(ConfigError):
    """A flag's value that can never work (an unknown name, a size out of range): the CLI's usage-error path, exit 2,
    as for a malformed option."""

    exit_code = 2


class PipelineConfigError(UsageError):
    """A pipeline config section has an unknown key, a wrong type or an impossible value, found before any stage
    runs; the message names the section and the key."""


class CheckpointError(RsladEdgeError):
    """A checkpoint is missing, corrupt, or does not match the architecture it is loaded into."""


class DatasetError(RsladEdgeError):
    """A dataset is missing, malformed, or does not fit the model."""


class RunDirError(RsladEdgeError):
    """The run directory exists without --resume/--force, or cannot be resumed."""


class TrainingDivergedError(RsladEdgeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(RsladEdgeError):
    """Ctrl-C or SIGTERM during training (distill, int8 QAT): the state was saved; the message says how to continue."""

    exit_code = 130


class ExportError(RsladEdgeError):
    """An export failed (unsupported op, missing tool, bad output path)."""


class ExportParityError(ExportError):
    """An exported artifact does not compute what the PyTorch model computes."""

    report = None  # the export's ParityReport, when the check ran


class RuntimeUnavailableError(RsladEdgeError):
    """A backend (TensorRT, CUDA, a Jetson) is not available where the command runs."""


class GateFailedError(RsladEdgeError):
    """A verification gate (--max-drop) was crossed."""

    exit_code = 3


def unknown_name_error(
    what: str, name: str, known: Iterable[str], error: type[ConfigError] = ConfigError
) -> ConfigError:
    """One message for every registry lookup: ``unknown --method 'rsald'. Did you mean 'rslad'? Known: ...``."""
    known = list(known)
    close = difflib.get_close_matches(name.lower(), known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return error(f"unknown {what} '{name}'.{hint} Known: {', '.join(known)}.")
