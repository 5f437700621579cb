"""Reward-model training (InstructGPT's RM): a scalar head on the SFT policy's trunk, fitted to preference
pairs with the Bradley–Terry loss

    L = mean_b −log σ(r(x, y_c) − r(x, y_r) − m_b) + center_coef · mean_b (r(x, y_c) + r(x, y_r))²

(m_b: the pair's margin when ``use_margin``; the centering term keeps scores near 0). Each step
scores the chosen and rejected replies of ``batch_size`` pairs in one forward; held-out pairs are
scored every ``eval_every`` steps. The final checkpoint (``checkpoints/final``) is the reward model:
the trunk as an ordinary model checkpoint plus ``reward_head.safetensors``; :func:`load_reward_model`
reads it back and :class:`RewardScorer` turns it into a reward function for the RL loop.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from posttrain.algorithms import losses
from posttrain.checkpoint import load_policy, restore_module
from posttrain.config import ConfigError, LoraConfig, ModelConfig, RewardModelConfig
from posttrain.distributed import data_parallel, set_threads
from posttrain.metrics import StepProgress
from posttrain.models.heads import RewardModel
from posttrain.models.hf_reward import is_sequence_classifier, load_sequence_classifier
from posttrain.preference_config import RMConfig
from posttrain.rewards.calls import Completion, Prompt, texts
from posttrain.trainers.checks import Checked, resolve_epochs
from posttrain.trainers.model_engine import ModelEngine, resolve_device, resolve_precision
from posttrain.trainers.pairs import (
    EncodedPair,
    context_length,
    load_pairs,
    pair_batch,
    pair_step,
    prepare_pairs,
    right_pad,
    train_on_pairs,
)
from posttrain.trainers.run import Parts, Run, TrainerState, nothing_to_do

HEAD = "reward_head"  # the head's file stem in a reward-model checkpoint


def pair_metrics(r_chosen: Tensor, r_rejected: Tensor, prefix: str = "") -> dict[str, float]:
    """Accuracy (a tie counts ½: chance is 0.5), mean margin r_c − r_r, and each side's score mean/std."""
    diff = r_chosen - r_rejected  # (B,)
    out = {
        f"{prefix}accuracy": ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item(),
        f"{prefix}margin": diff.mean().item(),
    }
    for name, r in (("chosen", r_chosen), ("rejected", r_rejected)):
        out[f"{prefix}rewards/{name}/mean"] = r.mean().item()
        out[f"{prefix}rewards/{name}/std"] = r.std().item() if len(r) > 1 else 0.0
    return out


def score_pairs(engine: ModelEngine, pairs: list[EncodedPair], pad_id: int, micro_batch: int) -> tuple[Tensor, Tensor]:
    """(r_chosen (N,), r_rejected (N,)) of ``pairs`` under no grad on the CPU, ``micro_batch`` pairs per forward."""
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), micro_batch):
            batch = pair_batch(pairs[start : start + micro_batch], pad_id).to(engine.device)
            with engine.autocast():
                scores = engine.module(batch.ids, batch.pad_mask).cpu()  # (2m,)
            chosen.append(scores[: len(batch.margins)])
            rejected.append(scores[len(batch.margins) :])
    return torch.cat(chosen), torch.cat(rejected)


def evaluate_pairs(engine: ModelEngine, pairs: list[EncodedPair], pad_id: int, micro_batch: int,
                   use_margin: bool) -> dict[str, float]:
    """Held-out ``eval/`` metrics: loss, accuracy, margin, score stats, and the accuracy per kind of
    rejected reply when the data names kinds (``eval/accuracy/slip`` …). Data parallel: each rank scores
    pairs rank, rank + N, ...; the scores are gathered in pair order, the same metrics on every rank."""
    if not pairs:
        return {}
    model = engine.module
    was_training = model.training
    model.eval()
    mine = engine.world.shard(list(range(len(pairs))))
    rc, rr = score_pairs(engine, [pairs[i] for i in mine], pad_id, micro_batch) if mine else (Tensor(), Tensor())
    model.train(was_training)
    scored = sorted(engine.world.gather(list(zip(mine, rc.tolist(), rr.tolist(), strict=True))))
    rc, rr = torch.tensor([c for _, c, _ in scored]), torch.tensor([r for _, _, r in scored])  # (N,), (N,)
    margins = torch.tensor([p.margin for p in pairs]) if use_margin else None
    out = {"eval/loss": losses.bradley_terry_loss(rc, rr, margins).item(), **pair_metrics(rc, rr, "eval/")}
    for kind in sorted({p.kind for p in pairs if p.kind}):
        rows = torch.tensor([p.kind == kind for p in pairs])
        out[f"eval/accuracy/{kind}"] = pair_metrics(rc[rows], rr[rows])["accuracy"]
    return out


def bt_step(engine: ModelEngine, pairs: list[EncodedPair], config: RMConfig, pad_id: int, gate,
            n_pairs: int | None = None) -> dict[str, float]:
    """One optimizer step on ``pairs``: the Bradley–Terry loss over micro-batches (weighted by their share of
    the step's ``n_pairs`` pairs, default ``len(pairs)``; data parallel: over all ranks, so the gradient is
    the whole batch's), clipped; ``gate(loss, grad_norm)`` decides whether it is applied (the health
    checks). The accuracy metrics are over every rank's pairs."""
    chosen, rejected = [], []

    def micro_batches():
        starts = list(range(0, len(pairs), config.micro_batch))
        for start, counts in engine.lockstep(starts, lambda: 0):  # FSDP2: every rank runs as many passes
            batch = pair_batch(pairs[start : start + config.micro_batch], pad_id).to(engine.device)
            m = len(batch.margins)
            with engine.autocast():
                scores = engine.module(batch.ids, batch.pad_mask).float()  # (2m,)
            loss = losses.bradley_terry_loss(scores[:m], scores[m:], batch.margins if config.use_margin else None,
                                             config.center_coef)
            if not counts:
                yield loss.expand(m) * 0.0, {}
                continue
            chosen.append(scores[:m].detach().cpu())
            rejected.append(scores[m:].detach().cpu())
            yield loss.expand(m), {}  # the micro-batch's mean loss for each of its m pairs

    out = pair_step(engine, n_pairs or len(pairs), micro_batches(), gate)
    scores = engine.world.gather(list(zip(torch.cat(chosen).tolist(), torch.cat(rejected).tolist(), strict=True)))
    chosen_all, rejected_all = torch.tensor(scores).T  # (N,), (N,)
    return out | pair_metrics(chosen_all, rejected_all)


def check_inputs(config: RMConfig) -> Checked:
    """The checks before the model loads (``train_reward_model`` and ``posttrain rm --dry-run``): the
    preference pairs load (ConfigError otherwise)."""
    pairs = load_pairs(config.data)
    epochs = resolve_epochs(config, len(pairs[0]), config.batch_size, "pairs")
    return Checked(f"data ({len(pairs[0])} train / {len(pairs[1])} test pairs)", pairs=pairs, epochs=epochs)


def train_reward_model(config: RMConfig, progress: bool = True) -> dict[str, float]:
    """Train a reward model as configured (resuming per ``config.resume``); returns the last held-out metrics."""
    set_threads(config.threads)  # under torchrun: shared by the processes on this node
    torch.manual_seed(config.seed)
    checked = check_inputs(config)  # sets steps when epochs > 0
    if checked.epochs:
        print(f"rm: {checked.epochs}")
    world, device = data_parallel(config, resolve_device(config.device), checked.summary)
    run = Run(config, "rm", world)
    if nothing_to_do(run, print):
        return run.state["extra"].get("last_eval", {})
    precision = resolve_precision(config.precision, device, config.model.dtype)
    trunk, tokenizer = load_policy(config.model, config.lora)
    rm = ModelEngine(RewardModel.from_policy(trunk), config.optim, device, precision, config.activation_checkpointing,
                     world=world, strategy=config.distributed.strategy)
    state = TrainerState()
    parts = Parts(trunk, tokenizer, state, engines={"rm": rm}, modules={HEAD: rm.module.head})
    with run.preemption, StepProgress("rm", config.steps, ("loss", "accuracy", "eval/accuracy"),
                                      progress and world.main, initial=run.start_step, quiet=not world.main,
                                      every=config.log.every) as bar:
        run.check_config(bar.print)
        train, test = prepare_pairs(config, tokenizer, trunk, bar.print, checked.pairs)
        run.open(bar.print)
        step = run.resume(parts, bar.print)
        if run.resume_from is None and run.needs_start_checkpoint:
            run.save(0, parts)

        def evaluate() -> dict:
            """The held-out metrics (the pairs split over the ranks), the same on every rank."""
            with rm.gathered():
                return evaluate_pairs(rm, test, tokenizer.pad_id, config.micro_batch, config.use_margin)

        def update(rows: list[int], n_pairs: int, gate) -> dict:
            return bt_step(rm, [train[i] for i in rows], config, tokenizer.pad_id, gate, n_pairs)

        train_on_pairs(run, parts, bar, rm, step, len(train), config, update, evaluate, config.eval_every)
    run.close()
    return state.last_eval


def check_reward_checkpoint(path: str | Path) -> Path:
    """``path`` as a Path; ConfigError unless it holds a reward-model checkpoint (the head's weights) or a
    Hugging Face sequence-classification model (TRL's ``RewardTrainer`` output)."""
    path = Path(path)
    if not (path / f"{HEAD}.safetensors").exists() and not is_sequence_classifier(path):
        raise ConfigError(f"{path} is not a reward model: neither a posttrain checkpoint (no {HEAD}.safetensors; "
                          "train one with `posttrain rm` and use its checkpoints/final) nor a Hugging Face "
                          "*ForSequenceClassification directory")
    return path


def load_reward_model(path: str | Path, dtype: str = "float32", device: str | torch.device = "cpu"):
    """A reward model written by :func:`train_reward_model` (its ``checkpoints/final`` or any step), or an HF
    sequence classifier with one label (posttrain/models/hf_reward.py) → (the model in eval mode, its
    tokenizer); either is called as ``model(idx, pad_mask)`` (B, T) → (B,)."""
    path = check_reward_checkpoint(path)
    if is_sequence_classifier(path):
        return load_sequence_classifier(path, dtype, device)
    trunk, tokenizer = load_policy(ModelConfig(str(path), dtype=dtype), LoraConfig(), device)
    model = RewardModel(trunk, trunk.hidden_size)
    restore_module(model.head, path, HEAD)
    return model.to(device).eval().requires_grad_(False), tokenizer


class RewardScorer:
    """A reward model as a reward function with TRL's signature, for the RL loop:
    ``scorer(prompts, completions, conv=None, **_) -> list[float]``, each score clipped to ``clamp``.

    When the policy shares the reward model's vocabulary and the rollout passes ``token_ids`` (the
    sampled ids), those are scored as they are: decoding and re-encoding text need not give back the
    same ids (the built-in tokenizer reads " ####" written after a tool output as other pieces than it
    generated), and the reward model must see what it was trained on. Otherwise the reply is rendered
    after the prompt conversation (``conv[i]['messages']`` when given, else the prompt: its messages, or
    its string as one user turn) with the reward model's own tokenizer; a conversational completion is
    read as its text. A sequence longer than the model's context keeps its
    last tokens (where the score is read). Batched, no gradients, and not subject to ``reward_timeout``
    (see ``RewardSet``).
    """

    __name__ = "reward_model"  # its name in the rewards/<name>/… metrics
    inline = True  # RewardSet runs it in the trainer's thread, with no timeout (compute, not a hang)

    def __init__(self, model: RewardModel, tokenizer, batch_size: int = 64, clamp: tuple[float, float] = (-10, 10),
                 policy_tokenizer=None):
        self.model, self.tokenizer, self.batch_size, self.clamp = model, tokenizer, batch_size, clamp
        self.limit = context_length(getattr(model, "trunk", model))
        self.device = next(model.parameters()).device
        self.same_vocab = policy_tokenizer is not None and vocabulary(policy_tokenizer) == vocabulary(tokenizer)

    @classmethod
    def from_config(cls, config: RewardModelConfig, policy_tokenizer=None,
                    device: str | torch.device = "cpu") -> RewardScorer:
        model, tokenizer = load_reward_model(config.path, device=device)
        return cls(model, tokenizer, config.batch_size, config.clamp, policy_tokenizer)

    def _ids(self, prompt: str | list[dict] | dict, completion: str) -> list[int]:
        if isinstance(prompt, dict):
            messages = prompt["messages"]
        else:
            messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self.tokenizer.render_conversation(
            {"messages": [*messages, {"role": "assistant", "content": completion}]})
        return ids

    def score(self, prompts: list, completions: list[str]) -> Tensor:
        """Scores (B,) of ``completions[i]`` answering ``prompts[i]`` (a string, a list of messages or a
        conversation dict)."""
        return self.score_ids([self._ids(p, c) for p, c in zip(prompts, completions, strict=True)])

    def score_ids(self, seqs: list[list[int]]) -> Tensor:
        """Scores (B,) of token sequences in the reward model's vocabulary, clipped to ``clamp``."""
        seqs = [s[-self.limit :] if self.limit else s for s in seqs]
        out = []
        with torch.no_grad():
            for start in range(0, len(seqs), self.batch_size):
                ids, pad_mask = right_pad(seqs[start : start + self.batch_size], self.tokenizer.pad_id)  # (b, T)
                out.append(self.model(ids.to(self.device), pad_mask.to(self.device)).cpu())
        return torch.cat(out).clamp(*self.clamp) if out else torch.zeros(0)

    def __call__(self, prompts: list[Prompt], completions: list[Completion], conv: list[dict] | None = None,
                 token_ids: list[list[int]] | None = None, **_) -> list[float]:
        if token_ids is not None and self.same_vocab:
            return self.score_ids(token_ids).tolist()
        return self.score(conv if conv is not None else prompts, texts(completions)).tolist()


def vocabulary(tokenizer) -> object:
    """What identifies a tokenizer's ids: the built-in one's word list, an HF tokenizer's vocab mapping."""
    hf = getattr(tokenizer, "hf", None)
    return hf.get_vocab() if hf is not None else tokenizer.words
