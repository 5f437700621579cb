"""Where the RL loop's rollouts come from: the asynchronous driver. Synchronous RL is this driver with
``rollout.max_staleness`` K = 0, not a second code path.

Step k asks :meth:`Rollouts.next` for its rollout. Before it waits, the rollouts of steps k … k + K are submitted to
the :class:`~posttrain.rollout.queue.RolloutQueue` (each as a weight sync, when one is due, of the weights the policy
has at submission, then a generation job), so with K > 0 the backend (Ray workers, a vLLM server) generates steps
k + 1 … k + K while step k trains. The queue runs jobs one at a time in submission order and gives results back in
that order, so a seeded run makes the same rows whatever the timing.

* **Staleness** counts the training steps that changed the weights between those that made a row and those that
  train on it (the *policy step*: a step applies ppo_epochs × minibatches optimizer updates, or none when nothing
  had signal; ``RLState.policy_steps`` maps each policy version to its policy step). Submitted at step k − K with
  the weights of then, a rollout has staleness ≤ K by construction; one past K (it cannot happen but by a bug) is
  dropped, counted in ``staleness/dropped``, and a fresh round drawn and generated now (``rollout.sync_every``
  N > 1, with K = 0, lets rows lag N − 1 steps on purpose: the bound is K + N − 1). With partial rollouts a group
  waits for its slowest row, so its finished rows and early segments are older: the bound applies to the
  generation that completed it, ``staleness/*`` reports each row's last segment and
  ``partial/first_segment_staleness_max`` its first; each token is corrected with its own behaviour log-prob.
* **Prompts** are drawn when a rollout is submitted (in the loop's thread, from the run's prompt RNG), and the
  prompt sampler learns each group's success when the rollout is consumed.
* **Dynamic sampling** (DAPO): the first round is generated ahead; refills are generated when the step consumes it,
  with the newest weights (queued behind the jobs already submitted, so the order stays fixed).
* **Rollback, skipped update**: the queue is flushed (its rows were made by weights that no longer exist; after a
  skipped update, before its checkpoint), said on the console and in events.jsonl; a rollback also drops the
  parked completions of partial rollouts. A stop cancels what is queued.
* **Evaluation** drains the queue first (waits for the generation in flight; its results stay queued), then
  syncs the weights of now.
* **Checkpoints** drain the queue and store its finished rollouts (``rollouts.pt``: plain containers and tensors,
  read back with torch's weights-only loader), so a resumed run consumes exactly the rollouts the uninterrupted
  run would have.

Under data parallelism a remote backend is driven by rank 0 (:class:`~posttrain.rollout.base.Follower` on the
others): every rank submits the same jobs (weights are gathered by all ranks together), rank 0's run, and each
popped result is broadcast from rank 0.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from posttrain.distributed import World
from posttrain.engine import RolloutBatch
from posttrain.random_streams import group_seed
from posttrain.rewards import Scores
from posttrain.rollout.base import sync, sync_due, sync_later
from posttrain.rollout.queue import RolloutQueue
from posttrain.trainers.partial import Segments
from posttrain.trainers.rl_state import RLState
from posttrain.trainers.rollout import PromptLimit, Rollout, Round, collect, draw_round, make_round

FILE = "rollouts.pt"  # the queued rollouts in a checkpoint


class Rollouts:
    """The rollouts of an RL run (see the module doc). ``rl``: the run's :class:`~posttrain.trainers.rl.RLSetup`;
    ``state``: its :class:`RLState` (the prompt sampler's state is kept there); ``prompt_rng``: the run's prompt
    RNG (checkpointed)."""

    def __init__(self, rl, state: RLState, prompt_rng: random.Random):
        self.rl, self.state, self.rng = rl, state, prompt_rng
        self.config = rl.config
        self.ahead = self.config.rollout.max_staleness
        self.bound = self.ahead + self.config.rollout.sync_every - 1  # sync_every > 1 (K = 0): rows lag on purpose
        self.world: World = rl.policy.world
        self.remote = bool(getattr(rl.rollout, "remote", False))
        self.queue = RolloutQueue(background=self.ahead > 0)
        self.next_step = 0  # the step the next submission is for
        self.planned = rl.rollout.version  # the backend's version once every queued sync has run
        self.sync_seconds = 0.0  # weight syncs run since the last pop (written by the queue's thread)
        self.lock = threading.Lock()
        self.limit = PromptLimit(self.config.max_prompt_length, self.config.long_prompts == "skip")
        S = self.config.rollout.segment_tokens  # partial rollouts: their pile of parked groups
        self.segments = Segments(S, self.config.sampling.max_new_tokens, self.config.seed) if S else None

    def start(self, step: int) -> None:
        """The run starts (or resumed) at ``step``; rollouts preloaded from a checkpoint are those of the next
        steps."""
        self.next_step = step + len(self.queue)
        self.rl.sampler.load_state_dict(self.state.prompt_sampling)

    # -- submitting ------------------------------------------------------------------------------------------

    def feed(self, step: int) -> None:
        """Submit the rollouts of the steps up to ``step`` + K (not past the last step); ``step``: the number of
        steps trained so far (the policy's weights are theirs)."""
        while self.next_step <= min(step + self.ahead, self.config.steps - 1):
            self._submit_sync(step)
            self._submit_round(self.next_step)
            self.next_step += 1

    def _submit_sync(self, step: int) -> None:
        rl = self.rl
        if not self.queue.background:  # inline: decided and sent when the job runs (now)
            self.queue.submit(self._sync_now, produces=False)
            return
        if not sync_due(self.planned, rl.policy.version, getattr(rl.rollout, "sync_every", 1)):
            return
        send = sync_later(rl.rollout, rl.policy, self.planned)
        self.planned = rl.policy.version
        self.queue.submit(partial(self._timed_sync, send), produces=False)

    def _sync_now(self) -> None:
        self._add_sync(sync(self.rl.rollout, self.rl.policy))

    def policy_step(self, version: int | None = None) -> int:
        """The policy step of policy ``version`` (default: the policy's now), numbered when first seen."""
        key, table = str(self.rl.policy.version if version is None else version), self.state.policy_steps
        if key not in table:
            table[key] = max(table.values(), default=-1) + 1
        return table[key]

    def _timed_sync(self, send) -> None:
        self._add_sync(send())

    def _add_sync(self, seconds: float) -> None:
        with self.lock:
            self.sync_seconds += seconds

    def _submit_round(self, step: int) -> None:
        """The first round of step ``step``'s rollout: prompts drawn now, generated and scored by the job."""
        rl, config = self.rl, self.config
        draw = partial(rl.sampler.draw, progress=step / config.steps)
        drawn = draw_round(draw, self.rng, rl.task, rl.tokenizer, config.prompts_per_step, self.limit)
        self.state.prompt_sampling = rl.sampler.state_dict()
        seeds = [group_seed(config.seed, step, i, 0) for i in range(config.prompts_per_step)]
        maker = self.segments.make_round if self.segments is not None else make_round
        make = partial(maker, rl.rollout, rl.scorer, drawn, config.samples_per_prompt, config.sampling, seeds,
                       step, made_at=self.policy_step(), version=rl.policy.version)
        if not self.queue.background:
            self.queue.submit(partial(self._inline, make))
        elif self.world.main or not self.remote:
            self.queue.submit(partial(self._background, make))  # rank 0 makes it; broadcast when popped
        else:
            self.queue.submit(lambda: None)

    def _background(self, make):
        """A job in the queue's thread: the backend generates elsewhere; a reward model scores under the trainer's
        autocast (thread-local, so entered here)."""
        with self.rl.policy.autocast():
            return make(world=World())

    def _inline(self, make):
        """A job in the loop's own thread (K = 0): the policy generates as itself (the local engine) or is synced."""
        rl = self.rl
        rl.policy.module.eval()
        with rl.policy.gathered(), rl.policy.autocast():  # FSDP2: each rank generates with the whole policy
            version = rl.rollout.version  # synced by the job just before
            return make(world=self.world, made_at=self.policy_step(version), version=version)

    # -- consuming -------------------------------------------------------------------------------------------

    def next(self, step: int) -> tuple[Rollout, dict]:
        """Step ``step``'s rollout (refills of dynamic sampling made now) and its metrics: staleness, the time
        waited for it and the time generation overlapped training."""
        rl, config = self.rl, self.config
        self.feed(step)
        first, waited, overlap = self._pop()
        dropped = 0
        now = self.policy_step()
        if max(first.made_at, default=now) < now - self.bound:  # generated by weights older than the bound
            dropped, first = len(first.texts), None
        refill = partial(self._refill, step) if self.queue.background else None
        with rl.policy.gathered() if refill is None else nullcontext(), rl.policy.autocast():
            ro = collect(rl.rollout, rl.task, rl.scorer, self.rng, config.prompts_per_step,
                         config.samples_per_prompt, config.sampling, seed=config.seed, step=step,
                         dynamic=config.dynamic_sampling, max_rounds=config.max_sampling_rounds,
                         draw=partial(rl.sampler.draw, progress=step / config.steps), limit=self.limit,
                         world=self.world, first=first, run=refill,
                         made_at=now if refill else self.policy_step(rl.rollout.version))
        rl.sampler.update(ro.pool_ids, ro.success)
        self.state.prompt_sampling = rl.sampler.state_dict()
        age = (now - ro.made_at).float() if len(ro.made_at) else torch.zeros(1)  # (B,)
        with self.lock:
            synced, self.sync_seconds = self.sync_seconds, 0.0
        metrics = {"staleness/mean": age.mean().item(), "staleness/max": age.max().item(),
                   "staleness/dropped": dropped, "timing_s/wait_for_rollout": waited, "timing_s/overlap": overlap,
                   "timing_s/gen": ro.seconds, "timing_s/update_weights": synced, "rollout/queued": len(self.queue),
                   "rollout/behaviour_version": ro.version}
        if self.segments is not None:
            oldest = (now - ro.first_made_at).float() if len(ro.first_made_at) else torch.zeros(1)  # (B,)
            metrics |= {"partial/parked": ro.parked, "partial/resumed": ro.resumed,
                        "partial/segments_mean": ro.segments.float().mean().item() if len(ro.segments) else 0.0,
                        "partial/first_segment_staleness_max": oldest.max().item()}
        return ro, metrics

    def _pop(self):
        if not self.queue.background or self.world.size == 1 or not self.remote:
            return self.queue.pop()
        if self.world.main:
            return self.world.on_main(self.queue.pop)
        self.queue.pop()  # this rank's placeholder
        return self.world.on_main(lambda: None)

    def _refill(self, step: int, make):
        """A refill round (dynamic sampling) with the newest weights, behind the jobs submitted already."""
        self._submit_sync(step)
        if self.world.main or not self.remote:
            return self.world.on_main(lambda: self.queue.call(partial(self._background, make)))
        self.queue.call(lambda: None)
        return self.world.on_main(lambda: None)

    # -- flushing, draining, checkpoints ---------------------------------------------------------------------

    def flush(self, step: int, parked: bool = True) -> int:
        """Drop every queued rollout (after a rollback or a skipped update) and, with ``parked``, the parked
        completions; the next submission is for ``step``. Returns how many rollouts were dropped."""
        dropped = self.queue.flush()
        if self.segments is not None and parked:
            self.segments.pile = []
        self.next_step = step
        self.rl.sampler.load_state_dict(self.state.prompt_sampling)
        # cancelled syncs never ran: the backend's version is rank 0's truth again, on every rank
        self.planned = self.world.on_main(lambda: self.rl.rollout.version)
        self.rl.rollout.version = self.planned
        return dropped

    def drain(self) -> None:
        """Wait for the jobs in flight (evaluation, checkpoints); their results stay queued. A job's error is
        raised on every rank (rank 0 runs the jobs of a remote backend) before any rank goes on to a collective."""
        error = None
        try:
            self.queue.drain()
        except Exception as err:  # noqa: BLE001 - raised on every rank below
            error = err
        self.world.raise_any(error)

    def synced(self) -> None:
        """The backend was synced outside the queue (evaluation, drained first): its version is the truth again."""
        self.planned = self.rl.rollout.version

    def save(self, directory: Path) -> None:
        """Store the queued rollouts (drained) in checkpoint ``directory`` (rank 0 writes checkpoints), as plain
        containers and tensors (torch's weights-only format: nothing pickled)."""
        results = self.queue.drain()
        pile = self.segments.state_dict() if self.segments is not None else {}
        if results or pile.get("pile"):
            torch.save(plain({"rollouts": [round_to_plain(r) for r in results], **pile}), directory / FILE)

    def load(self, directory: Path) -> None:
        """Replace the queue with the rollouts stored in checkpoint ``directory`` (none: empty)."""
        self.queue.flush()
        path = directory / FILE
        saved = torch.load(path, weights_only=True) if path.exists() else {}
        self.queue.preload([round_from_plain(r) for r in saved.get("rollouts", [])])
        if self.segments is not None:
            self.segments.load_state_dict(saved)

    def close(self) -> None:
        self.queue.close()




def plain(value, where: str = "rollouts"):
    """``value`` as what torch's weights-only loader reads back (numbers, strings, None, lists, dicts, tensors):
    numpy scalars and arrays converted; anything else a ValueError naming where it sits."""
    if value is None or isinstance(value, bool | int | float | str | torch.Tensor):
        return value
    if isinstance(value, dict):
        return {k: plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if type(value).__module__ == "numpy":
        return value.item() if getattr(value, "ndim", 1) == 0 else torch.from_numpy(value.copy())
    raise ValueError(f"the rollouts made ahead hold a {type(value).__name__} at {where}, which a checkpoint keeps "
                     "only as plain values (numbers, strings, lists, dicts, tensors): make the task's columns or "
                     "the rewards' log_extra plain, or use rollout.max_staleness=0 (and no segment_tokens)")


def round_to_plain(made: Round) -> dict:
    """A :class:`Round` as dicts, lists, numbers, strings and tensors (its problems by pool index only: the prompt
    is in ``convs``, and the sampler needs nothing else)."""
    plain = {f.name: getattr(made, f.name) for f in dataclasses.fields(made)}
    plain["picked"] = [[int(i), None] for i, _ in made.picked]
    plain["batch"] = dataclasses.asdict(made.batch)
    plain["scores"] = dataclasses.asdict(made.scores)
    return plain


def round_from_plain(plain: dict) -> Round:
    return Round(**{**plain, "picked": [tuple(p) for p in plain["picked"]], "batch": RolloutBatch(**plain["batch"]),
                    "scores": Scores(**plain["scores"])})
