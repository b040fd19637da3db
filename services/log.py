"""Process-wide logging set-up. Libraries only ever call ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)-7s %(process)d %(name)s: %(message)s"


def setup_logging(level: str = "INFO", component: str = "", log_file: Path | None = None) -> None:
    """Configure the root logger once per process: stderr, plus a file when given."""
    fmt = _FORMAT if not component else f"%(asctime)s %(levelname)-7s {component}[%(process)d] %(name)s: %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level, format=fmt, handlers=handlers, force=True)
    # Third-party chatter that drowns our own lines at INFO.
    for noisy in ("httpx", "urllib3", "filelock", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
