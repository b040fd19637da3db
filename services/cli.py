"""The ``dipo`` command line."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.syntax import Syntax

from services.config import ConfigError, dump_config, load_config

app = typer.Typer(
    name="dipo",
    help="Asynchronous actor-learner RL for LLMs with DiPO (DAPO + perplexity-guided reward reallocation).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect run configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")

console = Console()

ConfigArg = Annotated[Path, typer.Argument(help="YAML run config (see configs/).", exists=True, dir_okay=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a field: section.field=value (repeatable; beats file and env)."),
]


@config_app.command("show")
def config_show(config: ConfigArg, overrides: SetOpt = None) -> None:
    """Print the resolved config: defaults < file < DIPO_* environment < --set."""
    try:
        cfg = load_config(config, overrides or [])
    except (ConfigError, ValueError) as exc:
        console.print(f"[red]invalid config:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(Syntax(dump_config(cfg), "yaml", theme="ansi_dark", background_color="default"))


@app.command("redis")
def redis_cmd(
    appendfsync: Annotated[str, typer.Option(help="AOF fsync policy: always, everysec or no.")] = "everysec",
    password: Annotated[
        str | None, typer.Option(help="requirepass of the server.", envvar="DIPO_REDIS__PASSWORD")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Folder for the AOF (default: a temporary one).")] = None,
) -> None:
    """Start a local redis-server on a free port and print its URL until Ctrl-C."""
    from services.redis_server import LocalRedis

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalRedis(data_dir, appendfsync=appendfsync, password=password) as server:  # type: ignore[arg-type]
        console.print(f"redis-server pid {server.pid} serving {server.url} (data in {server.dir}); Ctrl-C stops it")
        sys.stdout.flush()
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    console.print("redis-server stopped")


@app.command("run")
def run_cmd(
    config: ConfigArg,
    overrides: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its newest checkpoint.")] = False,
    no_panel: Annotated[
        bool, typer.Option("--no-panel", help="Print one plain line per step instead of the live panel.")
    ] = False,
) -> None:
    """Train: start Redis, the learner, reward services and rollout servers, supervise them, write the report."""
    from services.launcher import LaunchError, launch

    try:
        code = launch(config, overrides or [], resume=resume, panel=not no_panel, console=console)
    except (ConfigError, ValueError) as exc:
        console.print(f"[red]invalid config:[/red] {exc}")
        raise typer.Exit(2) from exc
    except LaunchError as exc:
        console.print(f"[red]cannot start the run:[/red] {exc}")
        raise typer.Exit(2) from exc
    raise typer.Exit(code)


@app.command("report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (holds metrics.jsonl).", exists=True, file_okay=False)],
) -> None:
    """(Re)build <run_dir>/report/report.html and its plots from metrics.jsonl."""
    from services.report import build_report

    console.print(f"report: {build_report(run_dir)}")


@app.command(
    "eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def eval_cmd(ctx: typer.Context) -> None:
    """Evaluate a model: mean@k / maj@k for math, per-category accuracy for BFCL (see `dipo eval --help`).

    Runs `python -m evaluation` (the backends need torch, which this command-line process does not load).
    """
    import subprocess

    result = subprocess.run([sys.executable, "-m", "evaluation", *ctx.args], check=False)
    raise typer.Exit(result.returncode)


def main() -> None:
    """Entry point of `python -m services.cli`."""
    app()


if __name__ == "__main__":
    main()
