"""Errors with messages meant for users: they are shown without a traceback."""

from __future__ import annotations


class PtqError(Exception):
    """An error whose message says what went wrong and what to do; shown without a traceback."""


class ConfigError(PtqError):
    """A YAML file or an --override is malformed, names an unknown key, or has a wrong type."""


class DataUnavailable(PtqError):
    """A dataset is neither in the local data directory nor reachable on the hub."""


class ModelUnavailable(PtqError):
    """A model's weights cannot be found locally or downloaded."""


class UnsupportedModel(PtqError):
    """No architecture adapter knows this model."""


class NotApplicable(PtqError):
    """The method cannot run on this model, for a reason its message states: the cell is skipped."""


class NonFiniteMetric(PtqError):
    """A metric came out NaN or infinite."""


class BaselineFailed(PtqError):
    """The FP baseline a cell is judged against could not be measured."""


class DataMismatch(PtqError):
    """A local data file is not the file its data folder's SHA256SUMS lists (truncated or altered),
    or it cannot be decoded."""


class TooFewWindows(PtqError):
    """The evaluation text holds fewer windows than the configuration asks to score."""


class BackendUnavailable(PtqError):
    """A library backend cannot be installed or cannot run here (no CUDA, a conflicting pin), or
    cannot express the cell's settings (an FP8 weight format, a group size that does not divide the
    rows); its cells are skipped with this message, which names the command that installs or runs
    it, or the setting that stands in its way."""
