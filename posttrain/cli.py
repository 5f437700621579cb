"""The `posttrain` command (also `python -m posttrain`)."""

from __future__ import annotations

from contextlib import closing, contextmanager, nullcontext
from pathlib import Path
from typing import Annotated

import typer

from posttrain.config import ConfigError, ModelConfig, RLConfig, SFTConfig, TaskConfig, load_config

RESUME_HELP = ("auto: go on from RUN_DIR/checkpoints/latest if there is one (the default; refused when a value "
               "that shapes training changed) | force: the same, taking the changed values | never: start fresh | "
               "a checkpoint directory (same as resume=...)")
DRY_RUN_HELP = ("check the config, the data and the rewards as a run does before its model loads, print the "
                "resolved config, and stop: no model is loaded, nothing is written")
STAGES = {"SFTConfig": "sft", "RMConfig": "rm", "DPOConfig": "dpo", "RLConfig": "rl"}  # config class -> command
app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Post-train language models: SFT, reward models, DPO, RL with verifiable or learned rewards.")


def _load(cls, config: Path, overrides: list[str] | None, resume: str | None = None, launch: bool = True):
    """The config from a YAML file and overrides (``--resume X`` is the override ``resume=X``); ``-`` (or a
    first argument that is itself a key=value) means no file: defaults plus overrides. ``nproc=N`` (N > 1,
    with ``launch``) starts the command again as N processes (:func:`_launch`)."""
    overrides = [*(overrides or []), *([f"resume={resume}"] if resume else [])]
    if str(config) == "-":
        config = None
    elif "=" in str(config) and not config.exists():
        config, overrides = None, [str(config), *overrides]
    nproc, overrides = _nproc(overrides)
    try:
        loaded = load_config(cls, config, overrides)
    except ConfigError as err:
        typer.secho(f"config error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if nproc > 1 and launch:
        _launch(nproc, loaded)
    return loaded


def _nproc(overrides: list[str]) -> tuple[int, list[str]]:
    """(N of an ``nproc=N`` override, 1 without one; the other overrides)."""
    given = [o for o in overrides if o.startswith("nproc=")]
    rest = [o for o in overrides if not o.startswith("nproc=")]
    if not given:
        return 1, rest
    try:
        nproc = int(given[-1].partition("=")[2])
    except ValueError:
        nproc = 0
    if nproc < 1:
        typer.secho(f"config error: 'nproc' must be a whole number >= 1, got {given[-1]!r}", fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(2)
    return nproc, rest


def _launch(nproc: int, config) -> None:
    """Start the same command again as ``nproc`` processes on this machine (``torchrun --standalone
    --nproc_per_node=N``, which this process becomes), after the checks that can fail before any process
    starts: the config (loaded already), a global batch the processes can share, and enough GPUs for CUDA.
    Inside a torchrun job it does nothing (that job's size is what it is)."""

    import torch

    from posttrain.distributed import launched_world
    from posttrain.trainers.model_engine import resolve_device

    if launched_world().size > 1:
        return
    problem = None
    key = "prompts_per_step" if isinstance(config, RLConfig) else "batch_size"
    if getattr(config, key) < nproc:
        problem = f"{key} ({getattr(config, key)}) is the global batch: it must be at least nproc ({nproc})"
    elif config.distributed.strategy == "fsdp2" and config.precision == "fp16-mixed":
        problem = "precision fp16-mixed does not run with distributed.strategy fsdp2: use bf16-mixed, or strategy ddp"
    elif resolve_device(config.device).type == "cuda" and torch.cuda.device_count() < nproc:
        problem = f"nproc={nproc} but this machine has {torch.cuda.device_count()} CUDA device(s): use device=cpu"
    if problem:
        typer.secho(f"config error: {problem}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    from posttrain.dry_run import check_stage

    check_stage(STAGES[type(config).__name__], config)  # bad data or rewards: one line here, not one per process
    _torchrun(nproc)


def _torchrun(nproc: int) -> None:
    """Become ``torchrun --standalone --nproc_per_node=N -m posttrain`` + this command line without its
    ``nproc=N`` / ``--nproc N``. Does nothing inside a torchrun job or for one process; a call from inside
    another program (no nproc on the command line: a test runner) is an error, not a replaced process."""
    import os
    import sys

    from posttrain.distributed import launched_world

    if nproc <= 1 or launched_world().size > 1:
        return
    if not any(a.startswith(("nproc=", "--nproc")) for a in sys.argv):
        typer.secho("config error: nproc starts the command again under torchrun: use it on the command line",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    argv, skip = [], False
    for a in sys.argv[1:]:
        if not skip and not a.startswith(("nproc=", "--nproc")):
            argv.append(a)
        skip = a == "--nproc"  # its value is the next word
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={nproc}", "-m", "posttrain", *argv])


def _dry_run(stage: str, config) -> None:
    """``--dry-run``: print the resolved config and what the checks before the model loads found."""
    from posttrain.dry_run import dry_run

    typer.echo(dry_run(stage, config), nl=False)


@contextmanager
def _run_errors():
    """Around a training run: a config it cannot honour or data it cannot read exits 2, a run the health
    monitor stopped exits 3, a checkpoint that could not be written exits 4, the device out of memory exits 5,
    a reward function failing past reward_on_error / reward_max_failure_rate exits 6, a rollout backend's worker
    that died or hung exits 7, a run that SIGTERM or Ctrl-C stopped at a step boundary (with a checkpoint) exits 8
    (each with the message, not a traceback)."""
    from posttrain.checkpoint import CheckpointError
    from posttrain.distributed import leave
    from posttrain.rewards import RewardFailed
    from posttrain.rollout.base import RolloutError
    from posttrain.tasks.files import DataError
    from posttrain.trainers.model_engine import OutOfMemory
    from posttrain.trainers.preemption import RunInterrupted
    from posttrain.trainers.run import RunStopped

    try:
        yield
        leave()  # under torchrun: every rank ends here together
    except ConfigError as err:
        typer.secho(f"config error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except DataError as err:
        typer.secho(f"data error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except RunStopped as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(3) from None
    except RunInterrupted as err:
        typer.secho(str(err), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(8) from None
    except OutOfMemory as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(5) from None
    except RewardFailed as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(6) from None
    except RolloutError as err:
        typer.secho(f"rollout error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(7) from None
    except OSError as err:  # CheckpointError, or a run directory that cannot be written at all
        typer.secho(f"{'checkpoint' if isinstance(err, CheckpointError) else 'file'} error: {err}",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(4) from None


@app.callback()
def _ranks() -> None:
    """Under torchrun only rank 0 prints (every rank's errors still reach stderr)."""
    import os
    import sys

    from posttrain.distributed import launched_world

    if not launched_world().main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


@app.command()
def demo(
    quick: Annotated[bool, typer.Option("--quick", help="a tiny budget (seconds), for smoke tests")] = False,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="where everything is written (default: "
                                                 "runs/demo, runs/demo-quick with --quick)")] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    preference: Annotated[bool, typer.Option("--preference", help="the preference demo: reward model, DPO, and "
                                             "PPO against the reward model, from an SFT model")] = False,
    sft: Annotated[Path | None, typer.Option("--sft", help="--preference: start from this SFT checkpoint (default: "
                                             "train one, as the main demo does)")] = None,
    device: Annotated[str, typer.Option(help="auto (cuda when available) | cpu | cuda[:i]")] = "auto",
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16-mixed | fp16-mixed | bf16-true")] = "auto",
    nproc: Annotated[int, typer.Option(min=1, help="data-parallel processes on this machine (torchrun)")] = 1,
) -> None:
    """SFT the built-in GPT from scratch, then RL (Dr. GRPO); print held-out pass@1/pass@8 before and after RL.
    With --preference: reward model, DPO and PPO-with-the-reward-model from the SFT model."""
    _torchrun(nproc)
    with _run_errors():
        if preference:
            from posttrain.demo_preference import run_preference_demo

            name = "runs/demo-preference" + ("-quick" if quick else "")
            run_preference_demo(run_dir or Path(name), quick=quick, progress=progress, sft=sft, device=device,
                                precision=precision)
            return
        from posttrain.demo import run_demo

        run_demo(run_dir or Path("runs/demo-quick" if quick else "runs/demo"), quick=quick, progress=progress,
                 device=device, precision=precision)


@app.command()
def sft(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/); '-': none, overrides only")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. optim.lr=1e-3")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    resume: Annotated[str | None, typer.Option(help=RESUME_HELP)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help=DRY_RUN_HELP)] = False,
) -> None:
    """Supervised fine-tuning on a task's solutions."""
    from posttrain.trainers.sft import train_sft

    with _run_errors():
        loaded = _load(SFTConfig, config, overrides, resume, launch=not dry_run)
        if dry_run:
            return _dry_run("sft", loaded)
        train_sft(loaded, progress=progress)


@app.command()
def rl(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/); '-': none, overrides only")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. algorithm=dapo")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    resume: Annotated[str | None, typer.Option(help=RESUME_HELP)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help=DRY_RUN_HELP)] = False,
) -> None:
    """On-policy RL from a checkpoint: algorithm=nanochat|grpo|dr_grpo|dapo|rloo|reinforce_pp|ppo."""
    from posttrain.trainers.rl import train_rl

    with _run_errors():
        loaded = _load(RLConfig, config, overrides, resume, launch=not dry_run)
        if dry_run:
            return _dry_run("rl", loaded)
        train_rl(loaded, progress=progress)


@app.command()
def rm(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/); '-': none, overrides only")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. data.source=DIR")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    resume: Annotated[str | None, typer.Option(help=RESUME_HELP)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help=DRY_RUN_HELP)] = False,
) -> None:
    """Train a reward model (scalar head, Bradley–Terry loss) on preference pairs."""
    from posttrain.preference_config import RMConfig
    from posttrain.trainers.reward_model import train_reward_model

    with _run_errors():
        loaded = _load(RMConfig, config, overrides, resume, launch=not dry_run)
        if dry_run:
            return _dry_run("rm", loaded)
        train_reward_model(loaded, progress=progress)


@app.command()
def dpo(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/); '-': none, overrides only")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. loss=ipo")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    resume: Annotated[str | None, typer.Option(help=RESUME_HELP)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help=DRY_RUN_HELP)] = False,
) -> None:
    """Direct preference optimisation on preference pairs: loss=sigmoid|ipo|hinge|robust."""
    from posttrain.preference_config import DPOConfig
    from posttrain.trainers.dpo import train_dpo

    with _run_errors():
        loaded = _load(DPOConfig, config, overrides, resume, launch=not dry_run)
        if dry_run:
            return _dry_run("dpo", loaded)
        train_dpo(loaded, progress=progress)


@app.command()
def pipeline(
    config: Annotated[Path, typer.Argument(help="pipeline YAML (see configs/pipeline_sft_rl.yaml)")],
    overrides: Annotated[list[str] | None, typer.Argument(
        help="key=value overrides: top-level (run_dir=runs/b, eval.samples=4) or a stage's as "
             "stages.NAME.KEY=VALUE (stages.rl.steps=5)")] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="check every stage's config, data and rewards (a "
                                          "stage's model and an earlier stage's output are not looked for), print "
                                          "the resolved pipeline, and stop: no model loaded, nothing written")] = False,
) -> None:
    """Run stages (sft, rm, dpo, rl, eval) in order, each from an earlier stage's output, into RUN_DIR/<stage>/;
    finished stages are skipped. Ends with one table comparing every policy (pass@1, pass@K, maj@K, format
    rate, mean length), also written to RUN_DIR/comparison.md and comparison.json."""
    from posttrain.pipeline import load_pipeline, run_pipeline

    nproc, overrides = _nproc(overrides or [])
    with _run_errors():
        loaded = load_pipeline(config, overrides)
        if dry_run:
            from posttrain.dry_run import dry_run_pipeline

            typer.echo(dry_run_pipeline(loaded), nl=False)
            return
        _torchrun(nproc)
        run_pipeline(loaded, progress=progress)


@app.command("config")
def config_(
    stage: Annotated[str, typer.Argument(help="sft | rm | dpo | rl")],
    preset: Annotated[str | None, typer.Option(help="rl: show the values of this algorithm preset (nanochat | grpo | "
                                               "dr_grpo | dapo | rloo | reinforce_pp | ppo)")] = None,
) -> None:
    """Print every config key of STAGE, dotted (optim.lr), with its default and its one-line doc.

    One `key: value  # doc` line per key: YAML that `posttrain STAGE` reads (a dotted key is a key of its section),
    so the output, or any part of it, is a config file to edit (posttrain config rl > rl.yaml). On the command line
    the same key is an override: posttrain rl rl.yaml optim.lr=1e-4."""
    from posttrain.config_docs import listing

    try:
        text = listing(stage, preset)
    except ConfigError as err:
        typer.secho(f"config error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(text, nl=False)


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Option(help="a posttrain checkpoint dir, an HF model dir or hub id, a .gguf file")],
    task: Annotated[str, typer.Option(help="arithmetic | gsm8k | dataset | short_answer")] = "gsm8k",
    split: Annotated[str, typer.Option(help="test | train (gsm8k)")] = "test",
    samples: Annotated[int, typer.Option(min=1, help="completions per problem (K of pass@k, maj@K)")] = 8,
    problems: Annotated[int, typer.Option(min=0, help="the first N problems of the split (0: all)")] = 256,
    data: Annotated[str | None, typer.Option(help="gsm8k (default openai/gsm8k) and dataset: a data file, a dir of "
                                             "split files, or a hub id")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="hash | xml | tool (default: the task's own)")] = None,
    task_option: Annotated[list[str] | None, typer.Option("--task-option", help="another task field as KEY=VALUE "
                           "(repeatable), e.g. prompt='Q: {question}', answer=label, reward=numeric_match")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="completion budget in tokens")] = 512,
    temperature: Annotated[float, typer.Option(min=0.0, help="sampling temperature (0: greedy)")] = 1.0,
    top_k: Annotated[int, typer.Option(min=0, help="keep the k most likely tokens (0: all)")] = 50,
    batch: Annotated[int, typer.Option(min=1, help="problems per engine call")] = 16,
    out: Annotated[Path | None, typer.Option(help="per-problem JSONL (default: eval_TASK_SPLIT.jsonl here)")] = None,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch's default)")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:i]")] = "auto",
    dtype: Annotated[str, typer.Option(help="HF models: float32 | bfloat16 | float16")] = "float32",
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    nproc: Annotated[int, typer.Option(min=1, help="processes on this machine (torchrun) sharing the problems")] = 1,
    backend: Annotated[str, typer.Option(help="where to generate: local | ray | vllm (HF models)")] = "local",
    rollout_option: Annotated[list[str] | None, typer.Option("--rollout-option", help="a rollout.* setting of the "
                              "backend as KEY=VALUE (repeatable), e.g. vllm.python=.venv-vllm/bin/python, "
                              "workers=2")] = None,
) -> None:
    """Sample K completions per problem; print format / plausible / exact counts, token stats, pass@k, maj@K.

    Writes one JSON line per problem; the report's numbers also come last on stdout as one JSON line."""
    import json

    import torch
    from rich.console import Console

    from posttrain.distributed import DistributedConfig, join, launched_world, leave, rank_device, set_threads
    from posttrain.engine import SamplingParams
    from posttrain.eval_report import load_eval, report_table, run_eval
    from posttrain.rollout.base import RolloutConfig, RolloutError, make_backend
    from posttrain.trainers.model_engine import resolve_device

    set_threads(threads)  # under torchrun: shared by the node's processes
    try:
        if nproc > 1 and launched_world().size == 1 and resolve_device(device).type == "cuda" and \
                torch.cuda.device_count() < nproc:  # (a device this machine lacks: one line, before any start)
            raise ConfigError(f"nproc={nproc} but this machine has {torch.cuda.device_count()} CUDA device(s): "
                              "use --device cpu")
        rollout = load_config(RolloutConfig, None, [f"backend={backend}", *(rollout_option or [])])
        rollout.check_keys((backend,), generates=False)
        if nproc > 1 and backend != "local":
            raise ConfigError(f"--backend {backend} is driven by one process: run it without --nproc")
        _torchrun(nproc)
        world = join(DistributedConfig(), resolve_device(device))  # under torchrun: each rank its share
        device = str(rank_device(resolve_device(device), world))
        params = SamplingParams(temperature, top_k or None, None, max_new_tokens)
        fields = [f"name={task}", f"test_size={problems}", *([f"data={data}"] if data else []),
                  *([f"format={fmt}"] if fmt else []), *(task_option or [])]
        if task == "dataset" and data and Path(data).is_file() and split == "test" and \
                not any(o.startswith("test_split=") for o in task_option or []):
            fields.append(f"test_split={data}")  # one file: evaluate its rows, not rows held out of it
        task_config = load_config(TaskConfig, None, fields)
        engine, task_obj, items = load_eval(ModelConfig(model, dtype), task_config, split, device)
        policy = engine.model
        if backend != "local":
            engine = make_backend(rollout, policy, engine.tokenizer, world.size)
    except (ValueError, OSError, ImportError) as err:  # ConfigError and FileNotFoundError included
        typer.secho(f"error: {(str(err) or type(err).__name__).splitlines()[0]}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    path = out or Path(f"eval_{task}_{split}.jsonl")
    try:
        with closing(engine) if backend != "local" else nullcontext():
            if backend != "local":  # the model's weights, sent once (version 0)
                engine.update_weights(0, policy.state_dict().items())
            report = run_eval(engine, task_obj, items, samples, params, batch, seed, path, progress, world)
    except RolloutError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(7) from None
    console = Console()
    console.print(report_table(report, f"{task} {split}: {report['problems']} problems x {samples} samples"))
    console.print(f"model: {model}\nper problem: {path}", soft_wrap=True)
    print(json.dumps(report))  # plain print: rich would wrap the line
    leave()  # under torchrun: every rank ends here together


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (finished or still going)")],
    out: Annotated[Path | None, typer.Option(help="where to write (default: RUN_DIR/report)")] = None,
) -> None:
    """Plots (PNG) and a page (HTML and Markdown) of a run: rewards, eval pass@k, KL, entropy, grad norm,
    lengths, learning rate, health events, before/after samples."""
    from posttrain.report import write_report

    try:
        page = write_report(run_dir, out)
    except (FileNotFoundError, ValueError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(f"report: {page}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    step: Annotated[int | None, typer.Option(help="checkpoint step (default: the final one, else latest)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="hf: a Hugging Face model directory")] = "hf",
    out: Annotated[Path | None, typer.Option(help="where to write (default: RUN_DIR/export/step_N-FORMAT)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing export")] = False,
    adapter: Annotated[bool, typer.Option("--adapter", help="HF LoRA checkpoints: also copy adapter/")] = False,
) -> None:
    """Export a checkpoint as a model other tools load (the built-in GPT as an HF Qwen3 model)."""
    from posttrain.export import export_checkpoint

    try:
        path = export_checkpoint(run_dir, step, fmt, out, adapter=adapter, overwrite=overwrite)
    except (FileNotFoundError, ValueError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(f"exported: {path}")


if __name__ == "__main__":
    app()
