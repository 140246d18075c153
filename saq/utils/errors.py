"""The one base class of every refusal saq makes for a bad input or an unusable result."""

from __future__ import annotations


class SaqUserError(Exception):
    """A refusal whose message names the problem and the fix (a wrong path, file, data set or setting; a
    model that gives NaN or cannot deploy). Command-line entry points print it as one line, without a
    traceback; library callers catch this one class."""


__all__ = ["SaqUserError"]
