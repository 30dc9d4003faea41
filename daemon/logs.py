"""structlog set up once per process: JSON in production, readable on a terminal.

Per-event context (event id, partition, offset) is bound with contextvars by the
loop that handles the event, so every line logged meanwhile carries it.
"""

from __future__ import annotations

import logging
import sys

import structlog

from daemon.config import LogConfig


class _CurrentStderr:
    """A file-like that always writes to whatever ``sys.stderr`` is right now."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(config: LogConfig) -> None:
    """Route structlog and the stdlib logging of our libraries to stderr."""
    level = getattr(logging, config.level.upper())
    as_json = config.format == "json" or (config.format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Look sys.stderr up at write time, not now: it may be swapped (tests, daemons).
        logger_factory=lambda *_args: structlog.PrintLogger(_CurrentStderr()),  # type: ignore[arg-type]  # duck-typed file: write/flush is all PrintLogger uses
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(
        level=max(level, logging.WARNING),
        stream=_CurrentStderr(),
        format="%(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # kafka-python warns "Task ran for …s" whenever the forward pass holds the GIL on a
    # small machine; that is expected here, not a fault.
    if level > logging.DEBUG:
        logging.getLogger("kafka").setLevel(logging.ERROR)
    # transformers announces every weight it loads; keep the terminal for what matters
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
