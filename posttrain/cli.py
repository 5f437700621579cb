"""The `posttrain` command (also `python -m posttrain`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from posttrain.config import ConfigError, RLConfig, SFTConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Post-train language models: SFT, then RL with verifiable rewards.")


def _load(cls, config: Path, overrides: list[str] | None):
    try:
        return load_config(cls, config, overrides or [])
    except ConfigError as err:
        typer.secho(f"config error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


@app.command()
def demo(
    quick: Annotated[bool, typer.Option("--quick", help="a tiny budget (seconds), for smoke tests")] = False,
    run_dir: Annotated[Path, typer.Option("--run-dir", help="where everything is written")] = Path("runs/demo"),
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """SFT the built-in GPT from scratch, then RL (Dr. GRPO); print held-out pass@1/pass@8 before and after RL."""
    from posttrain.demo import run_demo

    run_demo(run_dir, quick=quick, progress=progress)


@app.command()
def sft(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. optim.lr=1e-3")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Supervised fine-tuning on a task's solutions."""
    from posttrain.trainers.sft import train_sft

    train_sft(_load(SFTConfig, config, overrides), progress=progress)


@app.command()
def rl(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. algorithm=dapo")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """On-policy RL from a checkpoint: algorithm=nanochat|grpo|dr_grpo|dapo|rloo|reinforce_pp|ppo."""
    from posttrain.trainers.rl import train_rl

    train_rl(_load(RLConfig, config, overrides), progress=progress)


if __name__ == "__main__":
    app()
