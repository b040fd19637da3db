"""The command line every service's ``__main__`` shares: ``--config FILE [--set k=v ...] [--port-file F]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from services.config import RunConfig, load_config
from services.http import is_loopback
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
    problem = exposed_without_token(component, cfg)
    if problem is not None:
        parser.error(problem)  # status 2: a usage error, which the supervisor does not restart
    setup_logging(cfg.log_level, component, args.log_file)
    return cfg, args


def exposed_without_token(component: str, cfg: RunConfig) -> str | None:
    """Why ``component`` must not start: its mutating endpoints would listen beyond loopback without a token."""
    section = {"rollout_server": "rollout", "reward_service": "reward"}.get(component)
    if section is None:  # the learner's HTTP endpoints are read-only
        return None
    server = cfg.rollout.server if section == "rollout" else cfg.reward.server
    if is_loopback(server.host) or server.api_token:
        return None
    env = f"DIPO_{section.upper()}__SERVER__API_TOKEN"
    return (f"{section}.server.host={server.host} listens beyond loopback without an API token: set {env} "
            f"(or {section}.server.api_token), or bind 127.0.0.1")  # fmt: skip
