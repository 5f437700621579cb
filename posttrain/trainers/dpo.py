"""Direct preference optimisation (Rafailov et al. 2023) and its variants, on preference pairs.

Per pair, with sequence log-probs summed over the reply tokens only (the render mask: the prompt and
tool outputs do not count) and h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)):

    sigmoid: −(1−ε) log σ(βh) − ε log σ(−βh)     (ε > 0: conservative DPO)
    ipo:     (h − 1/(2β))²                        (Azar et al. 2023)
    hinge:   relu(1 − βh)                         (SLiC, Zhao et al. 2023)
    robust:  ((1−ε)(−log σ(βh)) + ε log σ(−βh)) / (1 − 2ε)   (Chowdhury et al. 2024)

(``losses.dpo_loss``), averaged over the pairs of a step. With ``rpo_alpha`` > 0 the loss also gets
α · (−Σ_t log π(y_c,t) / |y_c|), the chosen reply's mean token NLL (RPO, Pang et al. 2024): plain DPO
can lower the chosen reply's probability along with the rejected one's, which costs a reasoning
policy its right answers; the NLL term holds the chosen reply up. The reference π_ref is the starting policy:
a frozen copy, or, with LoRA, the same model with its adapter off. With ``precompute_ref`` every
pair's reference log-probs are computed once before training (as TRL's ``precompute_ref_log_probs``)
and the reference is dropped. Metrics are TRL's: the implicit rewards β(log π − log π_ref) of each
side (``rewards/chosen|rejected``), how often the chosen one is higher (``rewards/accuracies``), their
gap (``rewards/margins``) and the summed log-probs (``logps/chosen|rejected``), plus how often the
policy itself gives the chosen reply the higher log-prob (``logps/accuracies``); ``eval/`` the same
on held-out pairs, plus the task's pass@k when a task is configured.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from posttrain.algorithms import losses
from posttrain.checkpoint import load_policy
from posttrain.distributed import data_parallel, set_threads
from posttrain.engine import Engine
from posttrain.evaluation import evaluate_on
from posttrain.metrics import StepProgress
from posttrain.preference_config import DPOConfig
from posttrain.tasks import make_task
from posttrain.tools import default_registry
from posttrain.trainers.checks import Checked, resolve_epochs, task_data
from posttrain.trainers.model_engine import ModelEngine, resolve_device, resolve_precision
from posttrain.trainers.pairs import (
    EncodedPair,
    PairBatch,
    load_pairs,
    pair_batch,
    pair_step,
    prepare_pairs,
    sequence_logps,
    train_on_pairs,
)
from posttrain.trainers.run import Parts, Run, TrainerState, nothing_to_do


def chunks(engine: ModelEngine, pairs: list[EncodedPair], rows: list[int], pad_id: int, size: int,
           reference: ModelEngine | None, ref_logps: Tensor | None):
    """Micro-batches of ``pairs[rows]`` on the engine's device: (batch, reference log-probs (2m,): chosen then
    rejected), the latter from the precomputed table ``ref_logps`` (N, 2) when given, else from
    ``reference``'s module (no grad, in the engine's precision; FSDP2: inside the reference's
    :meth:`~ModelEngine.gathered`, which a caller may already hold)."""
    for start in range(0, len(rows), size):
        idx = rows[start : start + size]
        batch = pair_batch([pairs[i] for i in idx], pad_id).to(engine.device)
        if ref_logps is not None:
            ref = torch.cat([ref_logps[idx, 0], ref_logps[idx, 1]]).to(engine.device)  # (2m,)
        else:
            with torch.no_grad(), reference.gathered(), engine.autocast():
                ref = sequence_logps(reference.module, batch).float()  # (2m,)
        yield batch, ref


def precompute_reference(engine: ModelEngine, reference: ModelEngine, pairs: list[EncodedPair], pad_id: int,
                         size: int) -> Tensor:
    """Reference log-probs of every pair, (N, 2): [chosen, rejected], on the CPU (every rank scores them all)."""
    out = torch.zeros(len(pairs), 2)
    with reference.gathered():
        for (batch, ref), start in zip(chunks(engine, pairs, list(range(len(pairs))), pad_id, size, reference, None),
                                       range(0, len(pairs), size), strict=True):
            m = len(batch.margins)
            out[start : start + m] = torch.stack([ref[:m], ref[m:]], dim=1).cpu()
    return out


def dpo_terms(model, batch: PairBatch, ref: Tensor, config: DPOConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """The micro-batch's per-pair losses (m,) and its detached per-pair statistics."""
    logps = sequence_logps(model, batch).float()  # (2m,)
    m = len(batch.margins)
    loss = losses.dpo_loss(logps[:m], logps[m:], ref[:m], ref[m:], config.beta, config.loss, config.label_smoothing)
    if config.rpo_alpha > 0:
        n_tokens = (batch.targets[:m] >= 0).sum(-1).clamp(min=1)  # (m,)
        loss = loss - config.rpo_alpha * logps[:m] / n_tokens
    chosen_r, rejected_r = config.beta * (logps[:m] - ref[:m]).detach(), config.beta * (logps[m:] - ref[m:]).detach()
    return loss, {"rewards/chosen": chosen_r, "rewards/rejected": rejected_r,
                  "rewards/accuracies": (chosen_r > rejected_r).float(), "rewards/margins": chosen_r - rejected_r,
                  "logps/chosen": logps[:m].detach(), "logps/rejected": logps[m:].detach(),
                  "logps/accuracies": (logps[:m] > logps[m:]).float().detach()}


def dpo_step(engine: ModelEngine, pairs: list[EncodedPair], rows: list[int], pad_id: int, reference: ModelEngine | None,
             ref_logps: Tensor | None, config: DPOConfig, gate, n_pairs: int | None = None) -> dict[str, float]:
    """One optimizer step on ``pairs[rows]``: mean loss over the step's ``n_pairs`` pairs (default: the rows;
    data parallel: over all ranks), micro-batches weighted by their share, clipped; ``gate(loss, grad_norm)``
    (the health checks) decides whether it is applied. FSDP2: passes beyond this rank's own repeat its first
    micro-batch at weight 0 (:meth:`ModelEngine.lockstep`)."""
    def micro_batches():
        pieces = [rows[i : i + config.micro_batch] for i in range(0, len(rows), config.micro_batch)]
        for piece, counts in engine.lockstep(pieces, lambda: pieces[0]):
            ((batch, ref),) = chunks(engine, pairs, piece, pad_id, len(piece), reference, ref_logps)
            with engine.autocast():
                loss, stats = dpo_terms(engine.module, batch, ref, config)
            yield (loss, stats) if counts else (loss * 0.0, {})

    return pair_step(engine, n_pairs or len(rows), micro_batches(), gate)


def evaluate_dpo(engine: ModelEngine, pairs: list[EncodedPair], pad_id: int, reference: ModelEngine | None,
                 ref_logps: Tensor | None, config: DPOConfig) -> dict[str, float]:
    """``eval/`` loss and TRL metrics on the held-out pairs, and ``eval/rewards/accuracies/<kind>`` per
    kind of rejected reply when the data names kinds. Data parallel: each rank scores pairs rank, rank + N, ...;
    the per-pair values are gathered in pair order, the same metrics on every rank."""
    if not pairs:
        return {}
    model = engine.module
    was_training = model.training
    model.eval()
    mine = engine.world.shard(list(range(len(pairs))))
    scored: list[tuple[int, dict[str, float]]] = []  # (pair, its loss and statistics)
    with torch.no_grad():
        for start in range(0, len(mine), config.micro_batch):
            index = mine[start : start + config.micro_batch]
            ((batch, ref),) = chunks(engine, pairs, index, pad_id, len(index), reference, ref_logps)
            with engine.autocast():
                loss, parts = dpo_terms(model, batch, ref, config)
            values = {k: v.cpu().tolist() for k, v in {"loss": loss, **parts}.items()}
            scored += [(i, {k: v[j] for k, v in values.items()}) for j, i in enumerate(index)]
    model.train(was_training)
    scored = sorted(engine.world.gather(scored), key=lambda pair: pair[0])
    sums = {k: torch.tensor([r[k] for _, r in scored]) for k in scored[0][1]}  # {name: (N,)}
    out = {f"eval/{k}": v.mean().item() for k, v in sums.items()}
    for kind in sorted({p.kind for p in pairs if p.kind}):
        rows = torch.tensor([p.kind == kind for p in pairs])
        out[f"eval/rewards/accuracies/{kind}"] = sums["rewards/accuracies"][rows].mean().item()
    return out


def check_inputs(config: DPOConfig) -> Checked:
    """The checks before the model loads (``train_dpo`` and ``posttrain dpo --dry-run``): the preference pairs
    load, and the evaluation task's data, when a task is set, loads and has gold answers (ConfigError /
    DataError otherwise)."""
    pairs = load_pairs(config.data)
    epochs = resolve_epochs(config, len(pairs[0]), config.batch_size, "pairs")
    summary = f"data ({len(pairs[0])} train / {len(pairs[1])} test pairs"
    task = None
    if config.task is not None:
        task = make_task(config.task)
        task.check("eval")
        summary += f"; eval task {task_data(task)}"
    return Checked(summary + ")", task=task, pairs=pairs, epochs=epochs)


def train_dpo(config: DPOConfig, progress: bool = True) -> dict[str, dict[str, float]]:
    """Run DPO as configured (resuming per ``config.resume``); returns {"before": held-out metrics of the
    starting policy, "after": the last held-out metrics}."""
    set_threads(config.threads)  # under torchrun: shared by the processes on this node
    torch.manual_seed(config.seed)
    checked = check_inputs(config)  # sets steps when epochs > 0
    if checked.epochs:
        print(f"dpo: {checked.epochs}")
    world, device = data_parallel(config, resolve_device(config.device), checked.summary)
    run = Run(config, "dpo", world)
    if nothing_to_do(run, print):
        return {"before": run.state["extra"]["before"], "after": run.state["extra"]["last_eval"]}
    precision = resolve_precision(config.precision, device, config.model.dtype)
    task = checked.task
    model, tokenizer = load_policy(config.model, config.lora)
    # before any restore and before FSDP2 shards the policy: the starting policy (precomputing: the policy
    # itself, scored before it trains; LoRA: the policy's weights with the adapter off)
    frozen = None if config.precompute_ref else model.reference()
    policy = ModelEngine(model, config.optim, device, precision, config.activation_checkpointing, world=world,
                         strategy=config.distributed.strategy)
    reference = policy if frozen is None else ModelEngine(
        frozen, None, device, precision, world=world, strategy=config.distributed.strategy,
        shares=policy if getattr(model, "is_lora", False) else None)
    engine = Engine(model, tokenizer, default_registry()) if task is not None else None
    state = PairState()
    parts = Parts(model, tokenizer, state, engines={"policy": policy})
    pad = tokenizer.pad_id
    with run.preemption, StepProgress("dpo", config.steps, ("loss", "rewards/accuracies", "eval/rewards/accuracies"),
                      progress and world.main, initial=run.start_step, quiet=not world.main,
                      every=config.log.every) as bar:
        run.check_config(bar.print)
        train, test = prepare_pairs(config, tokenizer, model, bar.print, checked.pairs)
        ref_train = ref_test = None
        if config.precompute_ref:
            ref_train = precompute_reference(policy, reference, train, pad, config.micro_batch)
            ref_test = precompute_reference(policy, reference, test, pad, config.micro_batch)
            reference = None  # no longer needed: its memory goes back

        def evaluate() -> dict:
            """The held-out metrics (the pairs and the task's problems split over the ranks), the same on every
            rank."""
            with policy.gathered(), reference.gathered() if reference is not None else nullcontext():
                out = evaluate_dpo(policy, test, pad, reference, ref_test, config)
                if task is not None:
                    model.eval()
                    with policy.autocast():
                        out |= evaluate_on(task, engine, config.eval, world)
                return out

        run.open(bar.print)
        step = run.resume(parts, bar.print)
        if run.resume_from is None:
            state.before = state.last_eval = evaluate()
            run.write({"step": 0, **state.before})
            bar.print_metrics("before DPO", state.before)
            if run.needs_start_checkpoint:
                run.save(0, parts)

        def update(rows: list[int], n_pairs: int, gate) -> dict:
            return dpo_step(policy, train, rows, pad, reference, ref_train, config, gate, n_pairs)

        train_on_pairs(run, parts, bar, policy, step, len(train), config, update, evaluate, config.eval.every)
    run.close()
    return {"before": state.before, "after": state.last_eval}


@dataclass
class PairState(TrainerState):
    """DPO's checkpointed values: the starting policy's held-out metrics besides the last ones."""

    before: dict = field(default_factory=dict)
