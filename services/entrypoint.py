"""The command line every service's ``__main__`` shares: ``--config FILE [--set k=v ...] [--port-file F]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from services.config import RunConfig, load_config
from services.log import setup_logging


def parse_service_args(component: str, argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    """Parse the shared service flags, resolve the config and set up logging for ``component``."""
    parser = argparse.ArgumentParser(prog=f"python -m {component}", description=f"Run the dipo {component}.")
    parser.add_argument("--config", type=Path, help="YAML run config (defaults < file < DIPO_* env < --set).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config field, e.g. --set reward.server.port=8081 (repeatable).")  # fmt: skip
    parser.add_argument("--port-file", type=Path, help="Write the bound HTTP port to this file once listening.")
    parser.add_argument("--log-file", type=Path, help="Also log to this file.")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    setup_logging(cfg.log_level, component, args.log_file)
    return cfg, args
