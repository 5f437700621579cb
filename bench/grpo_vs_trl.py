"""Our GRPO step against TRL's ``GRPOTrainer``: seconds per optimizer step on the same model and prompts.

Both sides train the same tiny random HF Llama (``make_tiny_llama``: a BPE tokenizer trained on the
arithmetic corpus, ChatML template) on the same arithmetic prompts (``task.format=hash``: the question
and the '#### <number>' instruction), rendered with the chat template, with the same settings:
``--prompts`` prompts × ``--group`` completions per step, at most ``--max-new-tokens`` sampled tokens
per completion (``--lengths`` below), temperature 1 with no top-k / top-p, the same reward function
(:func:`digit_share`, TRL's signature, called by both), no KL term and no reference model, one
optimizer step per generation batch (no old-log-prob pass), the DeepSeekMath GRPO loss (group-std
advantages, clip 0.2, per-sequence mean of the token losses), AdamW (not fused, betas 0.9/0.95, no
weight decay, constant LR, grad-norm clip 1), fp32 on the CPU, the same torch thread count, no vLLM, no
gradient checkpointing, no logging, no evaluation and no checkpoints in the timed steps. Our update
runs the whole batch as one micro-batch (``max_tokens_per_micro_batch`` = rows × (128 + the budget),
rows packed without padding), as TRL's runs it as one padded batch (``gradient_accumulation_steps=1``);
``mismatch_every=0``, so our first step does not score the batch either.

* **ours**: ``posttrain.trainers.rl.train_rl`` in this process (``algorithm=grpo kl_coef=0``); the
  time of a step is its ``timing_s/step`` in ``metrics.jsonl`` (rollout, reward, advantage, update).
* **TRL**: ``trl.GRPOTrainer`` in a subprocess run by the TRL venv's python (this same file with
  ``--worker trl``, which imports only TRL-side packages); a step is timed from the trainer's
  ``on_step_begin`` to its ``on_step_end`` callback (generation, reward, loss, backward, optimizer).

Two ways to end a completion (``--lengths``); the table shows the mean completion length each side
actually produced, and tokens/s is computed from the tokens actually generated:

* ``forced`` (the default, budget 64): completions run to exactly ``max_new_tokens``. A random model
  samples its end-of-turn token now and then, which would make the sides' work differ by chance, so the
  copy of the model both sides load declares as its EOS a special token that lies outside the model's
  output vocabulary (it is added to the tokenizer only). No row can stop early on either side.
* ``natural`` (budget 256): the model keeps its EOS, the template's end-of-turn ``<|im_end|>``, and can
  sample it; lengths vary from row to row as in a real rollout (ours compacts finished rows and packs
  the update, TRL's ``generate`` and loss keep them as padding). A random model gives EOS about 1/512 of
  the mass (expected length about 204 of 256), so the copy both sides load has its EOS logit raised by
  a near-constant ``c``. A Llama's LM head has no bias, but a random one's final-norm hidden states h
  share a large common component m (their mean: |m| ≈ 8.9 of |h| ≈ 11.3, h·m/|m|² = 1.00 ± 0.05), so
  ``c · m / |m|²`` is added to the EOS row: the EOS logit rises by c·(h·m)/|m|² ≈ c, and does not get
  more sensitive to h than any other logit. (Adding a constant to every weight of the row moves the EOS
  logit with Σ_i h_i instead, which the first optimizer step shifted so far that every completion ran
  to the budget from step 2 on.) ``c`` is calibrated once per model build, deterministically
  (:func:`raise_eos`): the first step's prompts × G are sampled to the full budget with EOS suppressed
  (``torch.manual_seed(seed)``, HF ``generate``, T=1), and m is their mean h. Raising one logit leaves
  the distribution of the other tokens given "not EOS" unchanged, so the expected length under ``c`` is
  exactly the mean over those rows of Σ_t Π_{u<t} (1 − p_u(c)), p_u(c) the raised EOS probability at
  step u; ``c`` is found by bisection so that this is a third of the budget (default model: c ≈ 1.76).
  The sides then sample with their own RNGs, so their lengths differ by chance, and training moves them
  (both are printed per step). At lr 1e-4 this reward makes both sides' completions grow from 85 to
  about 216 tokens on average within 4 steps (measured 2026-12-06), which leaves almost no padding to
  compare, so ``natural`` trains at lr 1e-6 by default: the lengths stay near a third of the budget,
  and a step costs the same at any learning rate.

The two sides take turns step by step: ours runs step k, then the TRL process (waiting at its
``on_step_begin``, untimed) is let run its step k, then ours runs step k + 1, and so on, so a busy spell
on the machine (this VM is shared) hits both sides alike rather than one side's whole run. A run is
``--warmup`` untimed steps and ``--steps`` timed ones; ``--rounds`` such paired runs are made, with fresh
processes and models. Reported: the median s/step over all timed steps of each side, and the median of
the per-step ratios TRL ÷ ours. The last line is ``RESULT speedup=<TRL median s/step ÷ ours median s/step>``.

TRL is not a dependency of posttrain. It gets a venv of its own (gitignored), with the same torch
(``torch==2.13.0`` takes the local CPU wheel; an unpinned torch would pull the CUDA builds):

    python3 -m venv .venv-trl
    .venv-trl/bin/pip install torch==2.13.0 trl transformers peft accelerate datasets

    .venv/bin/python bench/grpo_vs_trl.py --trl-python .venv-trl/bin/python
    .venv/bin/python bench/grpo_vs_trl.py --lengths natural      # budget 256, EOS can be sampled
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEVER_EOS = "<|bench_no_eos|>"  # the stop token of the benchmark's model copy: outside the output vocabulary
TASK_FORMAT = "hash"  # the arithmetic task's prompts for HF chat models: question + '#### <number>' instruction
READY, DONE = "@@trl-step-ready", "@@trl-step-done"  # the TRL worker's lines on stdout around each step


def digit_share(prompts, completions, **kwargs) -> list[float]:
    """The share of a completion's characters that are digits: cheap, deterministic, and different for
    almost every completion (so every row has a non-zero advantage on both sides). TRL passes
    conversational completions as ``[{"role": "assistant", "content": ...}]``, posttrain as strings."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


def timed_calls(fn, times: list[float]):
    """``fn``, appending the wall time of each call to ``times`` (to split a step into its parts)."""
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - t0)

    return wrapper


# ----------------------------------------------------------------------------------------- TRL worker
def trl_worker(spec_path: Path, result_path: Path) -> None:
    """Run TRL's GRPOTrainer as ``spec`` says and write the per-step times (imports TRL-side packages only)."""
    spec = json.loads(spec_path.read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimer(TrainerCallback):
        """Wall time and tokens (prompt + completion, as TRL counts them) of every optimizer step. Before
        each step it says READY and waits, untimed, for a line on stdin; after it, it says DONE."""

        def __init__(self):
            self.times, self.tokens = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            print(READY, flush=True)
            sys.stdin.readline()
            self.t0, self.seen = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)
            self.tokens.append(state.num_input_tokens_seen - self.seen)
            print(DONE, flush=True)

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    P, G, steps = spec["prompts"], spec["group"], spec["steps"]
    convs = spec["conversations"][: P * steps]  # step k uses prompts k·P .. k·P + P − 1, as on our side
    prompt_ids = [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]) for c in convs]
    prompt_tokens = [len(ids) for ids in prompt_ids]
    config = GRPOConfig(
        output_dir=spec["out"], max_steps=steps, seed=spec["seed"], use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=P * G, gradient_accumulation_steps=1, steps_per_generation=1,
        num_iterations=1, num_generations=G, shuffle_dataset=False,
        max_completion_length=spec["max_new_tokens"], temperature=1.0, top_k=0, top_p=1.0,
        beta=0.0, loss_type="grpo", scale_rewards="group", epsilon=0.2,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=False, use_vllm=False, logging_strategy="no", report_to="none",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=[digit_share], args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": c} for c in convs]), callbacks=[timer])
    parts: dict[str, list[float]] = {"sampling": [], "rollout": []}
    for part, method in (("sampling", "_generate_single_turn"), ("rollout", "_generate_and_score_completions")):
        setattr(trainer, method, timed_calls(getattr(trainer, method), parts[part]))
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    completion_tokens = [t - sum(prompt_tokens[k * P: (k + 1) * P]) * G for k, t in enumerate(timer.tokens)]
    result_path.write_text(json.dumps({
        "step_s": timer.times, "gen_tokens": completion_tokens, "train_wall_s": wall, "parts": parts,
        "prompt_ids": prompt_ids, "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "trl": trl.__version__, "transformers": transformers.__version__},
    }))


# --------------------------------------------------------------------------------------------- ours
def build_model(out: Path, args) -> tuple[Path, list[list[dict]], float | None]:
    """The tiny Llama both sides load, the prompts our trainer draws, in order (its prompt RNG is
    ``random.Random(seed)``), as chat messages, and the EOS row's constant (natural lengths; None when
    forced). Forced lengths: EOS moved out of the output vocabulary; natural: EOS raised (:func:`raise_eos`)."""
    import random

    from transformers import AutoTokenizer

    from posttrain.models.tiny_llama import make_tiny_llama
    from posttrain.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask(format=TASK_FORMAT)
    # the tokenizer learns the task's questions and solutions (tool format: ArithmeticTask.corpus reads
    # tool parts) and the hash-format prompts
    corpus_rng = random.Random(0)
    texts = ArithmeticTask().corpus(corpus_rng)
    texts += [task.prompt(task.train_problem(corpus_rng))["messages"][0]["content"] for _ in range(500)]
    model_dir = make_tiny_llama(out / "llama", texts, vocab_size=args.vocab,
                                hidden_size=args.hidden, layers=args.layers, heads=args.heads,
                                kv_heads=args.kv_heads)
    rng = random.Random(args.seed)
    steps = args.warmup + args.steps
    convs = [task.prompt(task.train_problem(rng))["messages"] for _ in range(args.prompts * steps)]
    if args.lengths == "natural":
        return model_dir, convs, raise_eos(model_dir, convs[: args.prompts], args)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_special_tokens({"eos_token": NEVER_EOS})
    tokenizer.save_pretrained(model_dir)
    eos = tokenizer.convert_tokens_to_ids(NEVER_EOS)
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        data["eos_token_id"] = eos
        path.write_text(json.dumps(data, indent=2))
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert eos >= vocab, "the benchmark's stop token must lie outside the output vocabulary"
    return model_dir, convs, None


def raise_eos(model_dir: Path, convs: list[list[dict]], args) -> float:
    """Add ``c · m / |m|²`` to the LM head's EOS row, with ``c`` such that the expected completion length is a
    third of the budget; save the model and return ``c`` (the module docstring says why this direction).

    h: the final-norm hidden state (d,) at a completion step, m: its mean over every step of the calibration
    rows. The raised EOS logit is l_eos + c·u with u = h·m / |m|² (≈ 1: a near-constant bias), and the EOS
    probability p(c) = σ(l_eos + c·u − logsumexp(logits without EOS)). Rows sampled with EOS suppressed are
    exactly the raised model's rows given "no EOS yet", so E[length] = mean over rows of
    Σ_{t<budget} Π_{u<t} (1 − p_u(c)) (the EOS counts as a completion token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos, budget = tokenizer.eos_token_id, args.max_new_tokens
    torch.manual_seed(args.seed)
    hidden, eos_logit, rest = [], [], []  # per prompt: h (G, budget, d), l_eos and logsumexp of the others (G, budget)
    with torch.no_grad():
        for conv in convs:  # one prompt's G rows at a time: equal lengths, no padding
            prompt = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")["input_ids"]
            rows = model.generate(prompt.repeat(args.group, 1), do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, max_new_tokens=budget, min_new_tokens=budget,
                                  suppress_tokens=[eos], pad_token_id=tokenizer.pad_token_id)  # (G, p + budget)
            h = model.model(input_ids=rows).last_hidden_state[:, prompt.shape[1] - 1: -1].double()
            logits = h @ model.lm_head.weight.double().T  # (G, budget, V)
            hidden.append(h)
            eos_logit.append(logits[..., eos].clone())
            logits[..., eos] = -torch.inf
            rest.append(logits.logsumexp(-1))
    h, eos_logit, rest = torch.cat(hidden), torch.cat(eos_logit), torch.cat(rest)  # (R, budget, d), (R, budget)
    m = h.mean((0, 1))  # (d,)
    u = h @ m / m.square().sum()  # (R, budget)

    def mean_length(c: float) -> float:
        p = torch.sigmoid(eos_logit + c * u - rest)  # (R, budget): EOS probability at each step
        alive = torch.cumprod(torch.cat([torch.ones_like(p[:, :1]), 1 - p[:, :-1]], 1), 1)  # Π_{u<t} (1 − p_u)
        return alive.sum(1).mean().item()

    target, lo, hi = budget / 3, 0.0, 1.0
    while mean_length(hi) > target:
        lo, hi = hi, 2 * hi
        assert hi < 1e6, "raising the EOS logit does not shorten the completions"
    for _ in range(60):  # the expected length falls with c over [lo, hi] (checked below)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_length(mid) > target else (lo, mid)
    c = (lo + hi) / 2
    grid = [mean_length(c * k / 8) for k in range(9)]
    assert all(a >= b for a, b in zip(grid[:-1], grid[1:], strict=True)), f"length not falling with c: {grid}"
    with torch.no_grad():
        model.lm_head.weight[eos] += (c * m / m.square().sum()).float()
    model.save_pretrained(model_dir)
    print(f"EOS logit + {c:.4f} (EOS row + c·m/|m|², |m| {m.norm():.2f}, h·m/|m|² {u.mean():.3f} ± {u.std():.3f}):"
          f" expected completion length {mean_length(c):.1f} of {budget} (unraised: {mean_length(0.0):.1f})",
          flush=True)
    return c


def model_facts(model_dir: Path) -> tuple[int, list[int]]:
    """The parameter count and the stop ids as our trainer sees them."""
    from posttrain.models.hf import load_hf

    policy, tokenizer = load_hf(str(model_dir))
    return policy.num_params(), tokenizer.stop_ids


class TRLProcess:
    """The TRL worker as a subprocess that runs one step each time it is told to (see ``StepTimer``)."""

    def __init__(self, python: str, spec: dict, work: Path):
        self.spec_path, self.result_path = work / "trl_spec.json", work / "trl_result.json"
        self.spec_path.write_text(json.dumps(spec))
        self.result_path.unlink(missing_ok=True)
        self.log = (work / "trl_stderr.log").open("w")
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
        cmd = [python, str(Path(__file__).resolve()), "--worker", "trl", "--spec", str(self.spec_path),
               "--result", str(self.result_path)]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        self.wait_for(READY)  # loaded, and waiting at the first step
        self.ready = True

    def wait_for(self, marker: str) -> None:
        for line in self.proc.stdout:
            if line.strip() == marker:
                return
        self.fail()

    def step(self) -> None:
        """Let the worker run its next step; returns when that step is done."""
        if not self.ready:
            self.wait_for(READY)
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.wait_for(DONE)
        self.ready = False

    def finish(self) -> dict:
        self.proc.stdin.close()
        if self.proc.wait() != 0 or not self.result_path.exists():
            self.fail()
        self.log.close()
        return json.loads(self.result_path.read_text())

    def fail(self) -> None:
        self.proc.kill()
        self.log.close()
        tail = Path(self.log.name).read_text()[-6000:]
        sys.exit(f"TRL worker failed (exit {self.proc.wait()}); its stderr ends with:\n{tail}")


def run_pair(model_dir: Path, run_dir: Path, trl: TRLProcess, args) -> tuple[dict, dict]:
    """Our ``train_rl`` in this process, letting ``trl`` run its step k after each of our steps k."""
    import shutil

    import torch

    import posttrain.trainers.rl as rl
    from posttrain.config import RLConfig, load_config
    from posttrain.engine import Engine
    from posttrain.metrics import read_jsonl
    from posttrain.trainers.run import Run

    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends
    config = load_config(RLConfig, None, [
        f"model={model_dir}", f"run_dir={run_dir}", f"seed={args.seed}", f"threads={args.threads}",
        f"task.format={TASK_FORMAT}", "algorithm=grpo", "kl_coef=0", "ppo_epochs=1", "minibatches=1",
        f"steps={args.warmup + args.steps}",
        f"prompts_per_step={args.prompts}", f"samples_per_prompt={args.group}",
        "sampling.temperature=1.0", "sampling.top_k=null", "sampling.top_p=null",
        f"sampling.max_new_tokens={args.max_new_tokens}",
        # the whole batch in one micro-batch (prompts are under 128 tokens), as TRL's one padded batch
        f"max_tokens_per_micro_batch={args.prompts * args.group * (128 + args.max_new_tokens)}",
        "mismatch_every=0",  # no scoring pass on any step (it would be an old-log-prob pass TRL does not make)
        f"optim.lr={args.lr}", "optim.warmup_steps=0", "optim.schedule=constant", "optim.betas=[0.9, 0.95]",
        "optim.weight_decay=0.0", "optim.grad_clip=1.0",
        "rewards={'bench.grpo_vs_trl:digit_share': 1.0}", "log_samples_every=0", "eval_before=false",
        "eval.every=0", "eval.problems=1", "eval.samples=1", "eval.ks=[1]", "eval.max_new_tokens=1", "save_every=0",
    ])
    assert config.advantage == "grpo" and config.loss_agg == "seq-mean-token-mean" and config.kl_coef == 0

    write = Run.write

    def take_turns(run: Run, record: dict) -> None:
        """The step's metrics row is written after its timing ends: TRL's turn comes there, untimed."""
        write(run, record)
        if "timing_s/step" in record:
            trl.step()

    sampling: list[float] = []
    prompts: list[list[int]] = []
    generate = Engine.generate

    def record_prompts(engine, batch_prompts, *rest, **kwargs):
        prompts.extend(batch_prompts)
        return generate(engine, batch_prompts, *rest, **kwargs)

    # time the sampling part of the rollout (as on the TRL side), and keep the prompts it was given
    Engine.generate = timed_calls(record_prompts, sampling)
    Run.write = take_turns
    try:
        rl.train_rl(config, progress=False)  # after the steps: a 1-sample evaluation and the final save (untimed)
    finally:
        Engine.generate, Run.write = generate, write
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert len(rows) == args.warmup + args.steps
    ours = {
        "step_s": [r["timing_s/step"] for r in rows],
        "gen_tokens": [r["completions/mean_length"] * args.prompts * args.group for r in rows],
        "parts": {"sampling": sampling[: len(rows)],  # the last call is the final evaluation's
                  "rollout": [r["timing_s/gen"] + r["timing_s/reward"] + r["timing_s/ref"] for r in rows]},
        "threads": torch.get_num_threads(), "prompt_ids": prompts[: len(rows) * args.prompts],
    }
    return ours, trl.finish()


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"),
                    help="python of the venv that has TRL (see the module docstring)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_grpo_vs_trl")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--lengths", choices=["forced", "natural"], default="forced",
                    help="forced: every completion runs to the budget (EOS outside the vocabulary); natural: "
                         "the model can sample its EOS, raised so that the mean length is a third of the budget")
    ap.add_argument("--max-new-tokens", type=int, help="the completion budget (default: 64 forced, 256 natural)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run")
    ap.add_argument("--rounds", type=int, default=3, help="paired runs (fresh processes and models each)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    ap.add_argument("--lr", type=float, help="constant learning rate, both sides (default: 1e-4 forced, 1e-6 "
                    "natural, where 1e-4 drifts the lengths from a third of the budget to near all of it in 4 steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512, help="BPE vocabulary size asked of the tokenizer trainer")
    ap.add_argument("--worker", choices=["trl"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.max_new_tokens is None:
        args.max_new_tokens = 256 if args.lengths == "natural" else 64
    if args.lr is None:
        args.lr = 1e-6 if args.lengths == "natural" else 1e-4
    if args.worker == "trl":
        trl_worker(args.spec, args.result)
        return

    sys.path.insert(0, str(ROOT))  # our reward is 'bench.grpo_vs_trl:digit_share'
    import torch

    from bench.rollout import cpu_name

    torch.set_num_threads(args.threads)
    if not Path(args.trl_python).exists():
        sys.exit(f"no TRL python at {args.trl_python}: create the venv as the module docstring says")
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir, convs, eos_raise = build_model(args.out, args)
    params, stop_ids = model_facts(model_dir)
    steps = args.warmup + args.steps
    spec = {"model": str(model_dir), "conversations": convs, "prompts": args.prompts, "group": args.group,
            "steps": steps, "max_new_tokens": args.max_new_tokens, "lr": args.lr, "seed": args.seed,
            "threads": args.threads}

    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, load average {load} (1/5/15 min)")
    print(f"model: tiny Llama {args.layers}L/{args.heads}H/{args.kv_heads}KV/{args.hidden}d, RANDOM init, "
          f"{model_dir}")
    ends = (f"exactly {args.max_new_tokens} new tokens (EOS outside the vocabulary)" if eos_raise is None else
            f"up to {args.max_new_tokens} new tokens (EOS logit + {eos_raise:.2f}: natural lengths)")
    print(f"step: {args.prompts} prompts x {args.group} completions x {ends}, "
          f"T=1, no top-k/top-p, reward digit_share, beta 0, 1 optimizer step per generation batch; "
          f"{args.warmup} warm-up + {args.steps} timed steps per run, {args.rounds} rounds per side\n", flush=True)
    t_start = time.perf_counter()
    ours, trl_runs, loads = [], [], [os.getloadavg()[0]]
    for r in range(args.rounds):
        trl = TRLProcess(args.trl_python, {**spec, "out": str(args.out / f"trl_r{r}")}, args.out)
        o, t = run_pair(model_dir, args.out / f"ours_r{r}", trl, args)
        ours.append(o)
        trl_runs.append(t)
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
        loads.append(os.getloadavg()[0])
        for name, run in (("ours", o), ("TRL ", t)):
            print(f"round {r + 1} {name}: s/step {[round(x, 3) for x in run['step_s']]}; median of the timed "
                  f"{statistics.median(run['step_s'][args.warmup:]):.3f}; mean completion per step "
                  f"{[round(x / (args.prompts * args.group), 1) for x in run['gen_tokens']]}", flush=True)
        print(f"load average {load}", flush=True)

    def timed(runs: list[dict], key: str) -> list[float]:
        return [x for run in runs for x in run[key][args.warmup:]]

    versions = trl_runs[0]["versions"]
    same_prompts = all(o["prompt_ids"] == t["prompt_ids"] for o, t in zip(ours, trl_runs, strict=True))
    lengths = [len(ids) for ids in ours[0]["prompt_ids"]]
    assert max(lengths) <= 128, "the micro-batch budget assumes prompts under 128 tokens"
    where = "outside the output vocabulary" if eos_raise is None else "the end-of-turn token, raised"
    print(f"\nmodel: {params:,} params; stop ids {stop_ids} ({where}); prompts "
          f"{min(lengths)}-{max(lengths)} tokens, mean {sum(lengths) / len(lengths):.1f}; both sides got the "
          f"same prompt token ids in the same order: {same_prompts}")
    print(f"ours: posttrain, torch {torch.__version__}, {ours[0]['threads']} threads")
    print(f"TRL:  trl {versions['trl']}, transformers {versions['transformers']}, torch {versions['torch']}, "
          f"{trl_runs[0]['threads']} threads")
    header = (f"{'side':<6} {'s/step median (min-max)':>26} {'gen tokens/step':>16} {'mean completion':>16}"
              f" {'tokens/s':>9} {'sampling s':>11} {'rollout s':>10} {'update s':>9}")
    print(header + "\n" + "-" * len(header))
    rows_per_step = args.prompts * args.group
    medians = {}
    for name, runs in (("ours", ours), ("TRL", trl_runs)):
        secs, toks = timed(runs, "step_s"), timed(runs, "gen_tokens")
        medians[name] = statistics.median(secs)
        mean_tok = sum(toks) / len(toks)
        sampling = statistics.median(x for run in runs for x in run["parts"]["sampling"][args.warmup:])
        rollout = [x for run in runs for x in run["parts"]["rollout"][args.warmup:]]
        update = statistics.median(s - r for s, r in zip(secs, rollout, strict=True))
        print(f"{name:<6} {spread(secs):>26} {mean_tok:>16.1f} {mean_tok / rows_per_step:>16.2f}"
              f" {mean_tok / medians[name]:>9.0f} {sampling:>11.3f} {statistics.median(rollout):>10.3f}"
              f" {update:>9.3f}")
    print("sampling: the token-by-token generation (ours Engine.generate, TRL _generate_single_turn); rollout:"
          " sampling + prompt rendering, decoding, reward, batch layout (TRL: + advantages); update: the rest"
          " of the step: forward, backward, optimizer step (ours: + advantages)")
    ratios = [t / o for o, t in zip(timed(ours, "step_s"), timed(trl_runs, "step_s"), strict=True)]
    print(f"TRL ÷ ours, step by step (step k of each side ran back to back): median "
          f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
    all_steps = timed(ours, "step_s") + timed(trl_runs, "step_s")
    if max(all_steps) > 2 * min(all_steps) or max(loads) > args.threads + 1:
        print(f"WARNING: the machine was busy during the run (step times {min(all_steps):.2f}-{max(all_steps):.2f}"
              f" s, 1-min load average up to {max(loads):.1f} with {args.threads} threads of ours): the absolute"
              " times are inflated; the per-step ratios compare steps that ran back to back")
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"total {time.perf_counter() - t_start:.0f} s; load average at the end {load}")
    print(f"RESULT speedup={medians['TRL'] / medians['ours']:.2f}")


if __name__ == "__main__":
    main()
