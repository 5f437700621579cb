"""Run health: checks on every step's numbers, each with a bound from config and an action.

Actions, weakest first: ``warn`` (log the event, go on), ``skip_step`` (the update is not applied),
``rollback`` (restore the last good checkpoint and lower the learning rate), ``stop`` (end the run).
An event's action is its check's ``*_action`` from config, except that ``rollback`` is reported as
``stop`` once ``max_rollbacks`` rollbacks were used (``on_rollback`` also returns False beyond that,
for a trainer that asks it first). ``update_allowed`` is False when any event's action is not ``warn``
or any event is ``nonfinite``.

Checks (``median`` = ``statistics.median`` of the check's history: the last ``window`` values that
were finite and fired nothing; a relative condition needs ``min_history`` of them, and a factor of 0
turns it off):

- ``kl`` (``check_rollout``, ``metrics["kl"]``, mean per-token KL to the reference, before any update):
  ``kl > kl_max``, or rising fast: ``kl > kl_rise * median and kl > kl_rise_floor``.
- ``length`` (``check_rollout``): ``metrics["completions/mean_length"] > length_rise * median``, or
  ``metrics["completions/clipped_ratio"] > clipped_ratio_max`` (no history; only the mean length is
  recorded, and only when its own condition did not fire).
- ``zero_std`` (``check_rollout``): ``metrics["frac_reward_zero_std"] >= zero_std_max`` (groups whose
  rewards are all equal carry no learning signal). No history.
- ``nonfinite`` (``check_update``): the loss or the global grad norm is NaN or inf. Such an update is
  never applied, whatever ``nonfinite_action`` says (with ``warn`` the event is logged and the run goes
  on without that update), and none of that call's numbers is recorded.
- ``grad_norm`` (``check_update``, the global grad norm before clipping): ``grad_norm > grad_spike * median``.
- ``entropy`` (``check_update``, mean token entropy of the minibatch; RL only): ``entropy < entropy_min``
  (when ``entropy_min > 0``) or collapsing: ``entropy < entropy_drop * median`` (when ``entropy_drop > 0``).

A NaN or inf value of a checked metric (kl, mean length, clipped ratio, zero-std share, entropy while
the entropy check is on) fires its own check: a broken number is never healthy. Metrics missing from
``check_rollout``'s dict are not checked. When several conditions of one check fire, the one event of
that check names them all in its message, and its ``values`` are those of the first. Events come
sorted by check name. With ``enabled=False`` nothing fires and nothing is recorded.
"""

from __future__ import annotations

import difflib
import math
import operator
import statistics
from collections import deque
from dataclasses import dataclass, field, fields

ACTIONS = ("warn", "skip_step", "rollback", "stop")
HISTORIES = ("entropy", "grad_norm", "kl", "length")  # the checks with a running median
_NON_NEGATIVE = ("kl_max", "kl_rise", "kl_rise_floor", "grad_spike", "entropy_min", "entropy_drop",
                 "length_rise", "clipped_ratio_max", "zero_std_max")

_ROLLOUT_KEYS = ("kl", "completions/mean_length", "completions/clipped_ratio", "frac_reward_zero_std")

Finding = tuple[str, dict]  # (message, values) of one condition that fired


@dataclass
class MonitorConfig:
    """Health checks (bounds and actions). Relative checks compare with a running median of past steps."""

    enabled: bool = True  # run the checks at all
    window: int = 20  # past values in each running median
    min_history: int = 5  # past values a relative ('rising/falling fast', 'spike') check needs before it fires
    kl_max: float = 1.0  # mean per-token KL to the reference above this fires 'kl'
    kl_rise: float = 5.0  # ... as does KL above this × its running median (and above kl_rise_floor) (0: off)
    kl_rise_floor: float = 0.05  # KL below this never counts as rising fast (noise around 0)
    kl_action: str = "warn"  # action of 'kl'
    grad_spike: float = 10.0  # grad norm (before clipping) above this × its running median fires 'grad_norm' (0: off)
    grad_action: str = "skip_step"  # action of 'grad_norm'
    nonfinite_action: str = "skip_step"  # a NaN/inf loss or gradient ('nonfinite'): never applied; then this
    entropy_min: float = 0.0  # mean token entropy below this fires 'entropy' (0: off)
    entropy_drop: float = 0.5  # ... as does entropy below this × its running median (0: off)
    entropy_action: str = "warn"  # action of 'entropy'
    length_rise: float = 3.0  # mean completion length above this × its running median fires 'length' (0: off)
    clipped_ratio_max: float = 0.5  # share of completions cut at max_new_tokens above this fires 'length'
    length_action: str = "warn"  # action of 'length'
    zero_std_max: float = 0.95  # frac_reward_zero_std at or above this (no learning signal) fires 'zero_std'
    zero_std_action: str = "warn"  # action of 'zero_std'
    rollback_lr_factor: float = 0.5  # a rollback multiplies the learning rate by this
    max_rollbacks: int = 3  # a rollback beyond this many becomes 'stop'

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_action") and value not in ACTIONS:
                close = difflib.get_close_matches(str(value), ACTIONS, n=1, cutoff=0.5)
                hint = f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(sorted(ACTIONS))}"
                raise ValueError(f"config key 'monitor.{f.name}' has unknown value '{value}' ({hint})")
        for name in _NON_NEGATIVE:
            if not getattr(self, name) >= 0:  # NaN fails too
                raise ValueError(f"config key 'monitor.{name}' must be >= 0, got {getattr(self, name)}")
        for name in ("window", "min_history"):
            if getattr(self, name) < 1:
                raise ValueError(f"config key 'monitor.{name}' must be >= 1, got {getattr(self, name)}")
        if self.min_history > self.window:
            raise ValueError(f"config key 'monitor.min_history' must be <= monitor.window ({self.window}), "
                             f"got {self.min_history}")
        if not 0 < self.rollback_lr_factor <= 1:
            raise ValueError(f"config key 'monitor.rollback_lr_factor' must be in (0, 1], "
                             f"got {self.rollback_lr_factor}")
        if self.max_rollbacks < 0:
            raise ValueError(f"config key 'monitor.max_rollbacks' must be >= 0, got {self.max_rollbacks}")


@dataclass
class Event:
    """One check that fired at one step."""

    step: int  # 1-based training step
    check: str  # kl | grad_norm | nonfinite | entropy | length | zero_std
    action: str  # warn | skip_step | rollback | stop
    message: str  # one human line with the numbers and the bound
    values: dict = field(default_factory=dict)  # the numbers that triggered it, e.g. value, bound, median

    def to_dict(self) -> dict:
        """A JSON line for events.jsonl; NaN/inf become the strings 'nan'/'inf'/'-inf' (JSON has neither)."""
        values = {k: v if v is None or math.isfinite(v) else str(v) for k, v in self.values.items()}
        return {"step": self.step, "check": self.check, "action": self.action, "message": self.message,
                "values": values}


def _g(x: float) -> str:
    """A number with 3 significant digits."""
    return f"{x:.3g}"


def _nonfinite(name: str, value: float) -> Finding:
    return f"{name} {value} is not finite", {"value": value}


_COMPARE = {">": operator.gt, "<": operator.lt, ">=": operator.ge}


def _bound(name: str, value: float, key: str, bound: float, sign: str = ">",
           median: float | None = None) -> Finding | None:
    """``value <sign> bound`` for an absolute bound named ``key``; the running median, if given, is only shown."""
    if not _COMPARE[sign](value, bound):
        return None
    if median is None:
        return f"{name} {_g(value)} {sign} {key} {_g(bound)}", {"value": value, "bound": bound}
    message = f"{name} {_g(value)} {sign} {key} {_g(bound)} (running median {_g(median)})"
    return message, {"value": value, "bound": bound, "median": median}


def _relative(name: str, value: float, key: str, factor: float, median: float | None, above: bool) -> Finding | None:
    """``value > factor * median`` (``above``) or ``value < factor * median``; silent while ``median`` is None,
    and for ``above`` while it is 0 (a history of zeros, e.g. no KL during a PPO critic warm-up, gives no scale
    to rise from: every later value would fire, and a value that fires never joins the history)."""
    if median is None or factor == 0 or (above and median <= 0):
        return None
    bound, sign = factor * median, ">" if above else "<"
    if not _COMPARE[sign](value, bound):
        return None
    message = f"{name} {_g(value)} {sign} {key} {_g(factor)} x running median {_g(median)} = {_g(bound)}"
    return message, {"value": value, "bound": bound, "median": median, "factor": factor}


def _first(*findings: Finding | None) -> Finding | None:
    """One finding from all that fired: their messages joined, the first one's values."""
    fired = [f for f in findings if f is not None]
    if not fired:
        return None
    return "; ".join(message for message, _ in fired), fired[0][1]


class Monitor:
    """The checks of a ``MonitorConfig`` over a run, with their histories and the rollback count.

    ``lr_scale`` is the product of the rollback factors so far (1.0 at start); the trainer multiplies
    its learning rate by it. ``state_dict``/``load_state_dict`` carry everything for an exact resume.
    """

    def __init__(self, config: MonitorConfig):
        self.config = config
        self.histories: dict[str, deque[float]] = {name: deque(maxlen=config.window) for name in HISTORIES}
        self.lr_scale = 1.0
        self.rollbacks = 0

    def check_rollout(self, step: int, metrics: dict) -> list[Event]:
        """Checks kl, length and zero_std on a scored rollout, before any update (see the module doc)."""
        if not self.config.enabled:
            return []
        got = {k: float(metrics[k]) for k in _ROLLOUT_KEYS if metrics.get(k) is not None}
        findings: dict[str, Finding | None] = {}
        if "kl" in got:
            findings["kl"] = self._kl(got["kl"])
            self._record("kl", got["kl"], findings["kl"])
        length_rise = clipped = None
        if "completions/mean_length" in got:
            length_rise = self._length_rise(got["completions/mean_length"])
            self._record("length", got["completions/mean_length"], length_rise)
        if "completions/clipped_ratio" in got:
            clipped = self._clipped(got["completions/clipped_ratio"])
        findings["length"] = _first(length_rise, clipped)
        if "frac_reward_zero_std" in got:
            findings["zero_std"] = self._zero_std(got["frac_reward_zero_std"])
        return self._events(step, findings)

    def check_update(self, step: int, loss: float, grad_norm: float, entropy: float | None = None) -> list[Event]:
        """Checks nonfinite, grad_norm and entropy before one optimizer step (see the module doc)."""
        if not self.config.enabled:
            return []
        loss, grad_norm = float(loss), float(grad_norm)
        findings: dict[str, Finding | None] = {}
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            findings["nonfinite"] = (f"loss {_g(loss)}, grad norm {_g(grad_norm)}: not finite, the update is skipped",
                                     {"loss": loss, "grad_norm": grad_norm})
        else:
            findings["grad_norm"] = _relative("grad norm", grad_norm, "grad_spike", self.config.grad_spike,
                                              self._median("grad_norm"), above=True)
        if entropy is not None:
            findings["entropy"] = self._entropy(float(entropy))
        if "nonfinite" not in findings:  # an update that is never applied leaves no trace in the histories
            self._record("grad_norm", grad_norm, findings["grad_norm"])
            if entropy is not None:
                self._record("entropy", float(entropy), findings["entropy"])
        return self._events(step, findings)

    @staticmethod
    def update_allowed(events: list[Event]) -> bool:
        """False when any event is ``nonfinite`` or has an action other than ``warn``."""
        return not any(e.check == "nonfinite" or e.action != "warn" for e in events)

    @staticmethod
    def worst(events: list[Event]) -> str | None:
        """The strongest action among ``events`` (stop > rollback > skip_step > warn); None if there are none."""
        return max((e.action for e in events), key=ACTIONS.index, default=None)

    def on_rollback(self) -> bool:
        """Records a rollback (``lr_scale *= rollback_lr_factor``); False when it is one beyond ``max_rollbacks``."""
        self.rollbacks += 1
        self.lr_scale *= self.config.rollback_lr_factor
        return self.rollbacks <= self.config.max_rollbacks

    def state_dict(self) -> dict:
        """Plain JSON-able data: the histories (oldest first), ``lr_scale`` and ``rollbacks``."""
        return {"histories": {name: list(h) for name, h in self.histories.items()},
                "lr_scale": self.lr_scale, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        """Restores ``state_dict()`` output; a history longer than this config's window keeps its newest values."""
        w = self.config.window
        self.histories = {name: deque(map(float, state["histories"][name]), maxlen=w) for name in HISTORIES}
        self.lr_scale = float(state["lr_scale"])
        self.rollbacks = int(state["rollbacks"])

    def _median(self, name: str, need: int | None = None) -> float | None:
        """Running median of a history, or None while it holds fewer than ``need`` (default ``min_history``)."""
        history = self.histories[name]
        return statistics.median(history) if len(history) >= (need or self.config.min_history) else None

    def _record(self, name: str, value: float, fired: Finding | None) -> None:
        """Adds a finite value that fired nothing to its history (the deque drops the oldest)."""
        if fired is None and math.isfinite(value):
            self.histories[name].append(value)

    def _kl(self, kl: float) -> Finding | None:
        c = self.config
        if not math.isfinite(kl):
            return _nonfinite("KL", kl)
        rising = _relative("KL", kl, "kl_rise", c.kl_rise, self._median("kl"), above=True)
        return _first(_bound("KL", kl, "kl_max", c.kl_max, median=self._median("kl", need=1)),
                      rising if kl > c.kl_rise_floor else None)

    def _length_rise(self, length: float) -> Finding | None:
        if not math.isfinite(length):
            return _nonfinite("mean length", length)
        return _relative("mean length", length, "length_rise", self.config.length_rise, self._median("length"),
                         above=True)

    def _clipped(self, ratio: float) -> Finding | None:
        if not math.isfinite(ratio):
            return _nonfinite("clipped ratio", ratio)
        return _bound("clipped ratio", ratio, "clipped_ratio_max", self.config.clipped_ratio_max)

    def _zero_std(self, frac: float) -> Finding | None:
        if not math.isfinite(frac):
            return _nonfinite("frac_reward_zero_std", frac)
        return _bound("frac_reward_zero_std", frac, "zero_std_max", self.config.zero_std_max, ">=")

    def _entropy(self, entropy: float) -> Finding | None:
        c = self.config
        if c.entropy_min == 0 and c.entropy_drop == 0:
            return None
        if not math.isfinite(entropy):
            return _nonfinite("entropy", entropy)
        below_min = _bound("entropy", entropy, "entropy_min", c.entropy_min, "<") if c.entropy_min > 0 else None
        return _first(below_min, _relative("entropy", entropy, "entropy_drop", c.entropy_drop,
                                           self._median("entropy"), above=False))

    def _events(self, step: int, findings: dict[str, Finding | None]) -> list[Event]:
        """Events of the checks that fired, sorted by check name, with their configured (or escalated) action."""
        events = []
        for check in sorted(k for k, f in findings.items() if f is not None):
            message, values = findings[check]
            action = getattr(self.config, f"{'grad' if check == 'grad_norm' else check}_action")
            if action == "rollback" and self.rollbacks >= self.config.max_rollbacks:
                action, message = "stop", f"{message} (max_rollbacks {self.config.max_rollbacks} used: stop)"
            events.append(Event(step, check, action, message, values))
        return events
