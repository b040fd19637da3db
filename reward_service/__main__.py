"""``python -m reward_service --config FILE``: the stream worker plus the HTTP API of one reward replica."""

from __future__ import annotations

from reward_service.app import create_app
from services.entrypoint import parse_service_args
from services.http import serve


def main(argv: list[str] | None = None) -> None:
    """Run one reward replica until SIGTERM/SIGINT."""
    cfg, args = parse_service_args("reward_service", argv)
    server = cfg.reward.server
    serve(create_app(cfg), server.host, server.port, port_file=args.port_file, log_level=cfg.log_level)


if __name__ == "__main__":
    main()
