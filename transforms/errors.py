"""Error types shared by the core. Messages never contain patient data.

Every error carries a ``reason``: one of the fixed codes the audit table uses.
"""

from __future__ import annotations

from collections.abc import Mapping

# Fixed reason codes of the audit table (``schemas.audit``); extend, never rename.
REASONS = (
    "not_dicom",
    "empty",
    "truncated",
    "too_deep",
    "too_large",
    "invalid_uid",
    "invalid_value",
    "refused_by_request",
    "duplicate_instance",
    "cannot_transcode",
    "not_selected",
    "read_error",
    "write_error",
    "internal_error",
    "dicomdir",
    "timeout",
)

#: Reasons whose rows are ``skipped``, not ``failed`` (no alert: nothing is wrong with the run).
SKIPPED_REASONS = frozenset({"not_selected", "dicomdir"})


class DeidError(Exception):
    """Base class. ``reason`` is an audit reason code."""

    reason = "internal_error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            if reason not in REASONS:
                raise ValueError(f"unknown reason code {reason!r}; allowed: {', '.join(REASONS)}")
            self.reason = reason


class RequestError(DeidError, ValueError):
    """The request body (or command line) is refused before any data is touched.

    The message names the offending key and says what is allowed.
    """

    reason = "refused_by_request"


def json_type(value: object) -> str:
    """The JSON name of a parsed request value's type, for messages (``null``, ``boolean``,
    ``number``, ``string``, ``array``, ``object``): the user wrote JSON, not Python."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


class InputError(DeidError):
    """An input file cannot be processed (not DICOM, truncated, too deep, ...)."""

    reason = "read_error"


class CannotTranscode(DeidError):
    """The requested transfer syntax cannot be produced without losing data."""

    reason = "cannot_transcode"


def is_work_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of the work on one file (what dead letters and codec loops
    catch): any ``Exception``, and the panic of a Rust codec, which pyo3 raises as
    ``PanicException``, a ``BaseException`` (e.g. pylibjpeg-rle on RLE segments that do not
    match Rows x Columns). Never KeyboardInterrupt, SystemExit or GeneratorExit."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"
