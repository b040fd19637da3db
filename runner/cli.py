"""The ``dipo`` command line."""

from __future__ import annotations

import signal
import sys
import threading
import time
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


def _version(value: bool) -> None:
    """Print the installed version and exit (the eager `--version` option)."""
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("dipo")
        except PackageNotFoundError:  # run from a source tree that was never installed
            text = "unknown (not installed)"
        console.print(f"dipo {text}")
        raise typer.Exit()


@app.callback()
def main_options(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Asynchronous actor-learner RL for LLMs with DiPO (DAPO + perplexity-guided reward reallocation)."""


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
    from runner.redis_server import LocalRedis

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
    from runner.launcher import LaunchError, launch

    try:
        code = launch(config, overrides or [], resume=resume, panel=not no_panel, console=console)
    except (ConfigError, ValueError) as exc:
        console.print(f"[red]invalid config:[/red] {exc}")
        raise typer.Exit(2) from exc
    except LaunchError as exc:
        console.print(f"[red]cannot start the run:[/red] {exc}")
        raise typer.Exit(2) from exc
    raise typer.Exit(code)


@app.command("chaos")
def chaos_cmd(
    config: ConfigArg,
    kills: Annotated[int, typer.Option(help="How many SIGKILLs to deliver, one failure at a time.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the choice of targets, moments and gaps.")] = 0,
    targets: Annotated[
        str, typer.Option(help="Comma-separated kinds to kill: rollout, reward, learner, redis.")
    ] = "rollout,reward,learner,redis",
    appendfsync: Annotated[str, typer.Option(help="Redis AOF fsync policy: always or everysec.")] = "always",
    gap: Annotated[str, typer.Option(help="Random wait after a recovery before the next kill, MIN,MAX seconds.")] = (
        "1,6"
    ),
    run_dir: Annotated[
        Path | None, typer.Option(help="Fresh folder for the run (default: runs/chaos-<seed>-<time>).")
    ] = None,
    overrides: SetOpt = None,
) -> None:
    """Train while SIGKILLing one process at a time (rollout, reward, learner, Redis), then audit the ledger.

    Writes <run_dir>/chaos/summary.json (kills by target, time to recover, lost, doubled) and exits 0 only if
    every released prompt is accounted for, none was used twice, versions only increased and the final
    checkpoint loads.
    """
    import json

    from runner.chaos import ChaosPlan, parse_appendfsync, parse_targets, run_chaos

    try:
        low, high = (float(x) for x in gap.split(","))
        plan = ChaosPlan(
            kills=kills,
            seed=seed,
            targets=parse_targets(targets),
            gap_s=(low, high),
            appendfsync=parse_appendfsync(appendfsync),
        )
        folder = run_dir or Path("runs") / f"chaos-{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
        result = run_chaos(config, overrides or [], plan, folder)
    except (ConfigError, ValueError) as exc:
        console.print(f"[red]invalid chaos run:[/red] {exc}")
        raise typer.Exit(2) from exc
    shown = {k: v for k, v in result.summary.items() if k not in ("kill_log", "ledger", "plan")}
    console.print_json(json.dumps(shown))
    console.print(f"summary: {result.path}")
    raise typer.Exit(result.exit_code)


@app.command("report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (holds metrics.jsonl).", exists=True, file_okay=False)],
) -> None:
    """(Re)build <run_dir>/report/report.html and its plots from metrics.jsonl."""
    from runner.report import build_report

    console.print(f"report: {build_report(run_dir)}")


@app.command("experiment")
def experiment_cmd(
    config: ConfigArg,
    arms: Annotated[
        str, typer.Option(help="Comma-separated arms: dapo, dipo, grpo, reward-only, penalty-only, alpha=X.")
    ] = "dapo,dipo",
    seeds: Annotated[str, typer.Option(help="A count (3 = seeds 0, 1, 2) or a comma-separated list (0,7,9).")] = "1",
    out: Annotated[Path | None, typer.Option(help="Experiment folder (default runs/experiments/<name>).")] = None,
    overrides: SetOpt = None,
    eval_items: Annotated[int, typer.Option(min=1, help="Held-out items evaluated (per category).")] = 100,
    eval_samples: Annotated[int, typer.Option(min=1, help="K: samples per held-out item (mean@K).")] = 4,
    eval_data: Annotated[
        str | None, typer.Option(help="Held-out data spec (docs/EVALUATION.md); default: the config's held-out set.")
    ] = None,
    eval_seed: Annotated[int, typer.Option(help="Sampling seed of every evaluation.")] = 0,
    eval_threads: Annotated[int | None, typer.Option(min=1, help="torch threads of the evaluation.")] = None,
    eval_batch_prompts: Annotated[int | None, typer.Option(min=1, help="Prompts per evaluation generate call.")] = None,
    baseline: Annotated[bool, typer.Option(help="Also evaluate the base model.")] = True,
    late_fraction: Annotated[float, typer.Option(help="Share of the steps, at the end, that is 'late'.")] = 1 / 3,
    report_only: Annotated[bool, typer.Option("--report-only", help="Only rebuild the comparison report.")] = False,
) -> None:
    """Train every arm x seed under identical conditions, evaluate each, and compare them (docs/EXPERIMENTS.md)."""
    from runner.experiment.plan import EvalSettings, build_plan, run_experiment
    from runner.experiment.report import build_experiment_report
    from runner.launcher import LaunchError

    settings = EvalSettings(eval_items, eval_samples, eval_seed, eval_data, eval_threads, eval_batch_prompts)
    try:
        plan = build_plan(config, arms, seeds, out, overrides or [], eval_settings=settings, baseline=baseline,
                          late_fraction=late_fraction)  # fmt: skip
        if report_only:
            console.print(f"report: {build_experiment_report(plan)}")
            return
        code = run_experiment(plan, console)
    except (ConfigError, ValueError) as exc:  # ExperimentError is a ValueError
        console.print(f"[red]invalid experiment:[/red] {exc}")
        raise typer.Exit(2) from exc
    except LaunchError as exc:
        console.print(f"[red]cannot start a run:[/red] {exc}")
        raise typer.Exit(2) from exc
    except KeyboardInterrupt as exc:  # outside a run (a run's Ctrl-C ends that run, which returns 130)
        console.print("interrupted: run the same command again to continue")
        raise typer.Exit(130) from exc
    raise typer.Exit(code)


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
    """Entry point of `python -m runner.cli`."""
    app()


if __name__ == "__main__":
    main()
