"""Dropping third-party log notices a user of ours cannot act on, narrowly and only for a while.

    with dropping("transformers.utils.import_utils", "requires torchvision (not installed)"):
        import diffusers pipelines ...

A filter on the named logger (the one that creates the record, so handlers anywhere see nothing)
drops records containing one of the fragments; everything else passes. Every use says why.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class _Dropping(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


@contextlib.contextmanager
def dropping(logger_name: str, *fragments: str) -> Iterator[None]:
    """Within the block, records of `logger_name` containing any of `fragments` are dropped."""
    logger, quiet = logging.getLogger(logger_name), _Dropping(fragments)
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
