"""``python -m rollout_server --config FILE``: the prompt-consuming worker plus the HTTP API of one rollout server."""

from __future__ import annotations

import torch

from rollout_server.app import create_app
from services.entrypoint import parse_service_args
from services.http import serve


def main(argv: list[str] | None = None) -> None:
    """Run one rollout server until SIGTERM/SIGINT."""
    cfg, args = parse_service_args("rollout_server", argv)
    # Process-wide, before the model loads: rollout servers share the machine's cores with the learner.
    torch.set_num_threads(cfg.rollout.torch_threads)
    server = cfg.rollout.server
    serve(create_app(cfg), server.host, server.port, port_file=args.port_file, log_level=cfg.log_level)


if __name__ == "__main__":
    main()
