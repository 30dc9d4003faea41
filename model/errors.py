"""The one exception root of exemplar, shared by every package.

::

    ExemplarError
    ├── ConfigError (ValueError)        bad settings; the message says what to set
    ├── DataError (ValueError)          an input file or row that cannot be used
    ├── BundleError                     a model directory that is not a usable bundle
    ├── StoreError                      the exemplar store refused an operation
    │   └── StoreUnavailable            transient: retry later
    └── StreamError                     the broker refused an operation
        └── BrokerUnavailable           transient: retry later

Adapters translate third-party errors (torch, qdrant, kafka-python) into these at
their boundary so callers never see another library's exception types.
"""

from __future__ import annotations


class ExemplarError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(ExemplarError, ValueError):
    """Configuration is missing or invalid."""


class DataError(ExemplarError, ValueError):
    """Input data cannot be read or does not have the expected shape."""


class BundleError(ExemplarError):
    """A path is not a model bundle, or the bundle is damaged or incompatible."""


class StoreError(ExemplarError):
    """The exemplar store failed an operation."""


class StoreUnavailable(StoreError):
    """The exemplar store cannot be reached right now; the caller may retry."""


class StreamError(ExemplarError):
    """The message broker failed an operation."""


class BrokerUnavailable(StreamError):
    """The broker cannot be reached right now; the caller may retry."""


TRANSIENT_ERRORS: tuple[type[ExemplarError], ...] = (StoreUnavailable, BrokerUnavailable)
