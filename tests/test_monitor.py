"""Specs for the run-health monitor: each check at its boundary, histories, actions, rollbacks, resume, config."""

from __future__ import annotations

import json
import math

import pytest

from posttrain.monitor import Event, Monitor, MonitorConfig

NAN, INF = float("nan"), float("inf")


def monitor(**overrides) -> Monitor:
    return Monitor(MonitorConfig(**overrides))


def checks(events: list[Event]) -> list[str]:
    return [e.check for e in events]


def feed_updates(m: Monitor, grad_norms: list[float], entropy: float | None = None) -> list[list[Event]]:
    return [m.check_update(i + 1, 1.0, g, entropy) for i, g in enumerate(grad_norms)]


# --- absolute bounds fire just above (zero_std: at) the bound -------------------------------------------------------


@pytest.mark.parametrize(
    ("metrics", "fired"),
    [
        ({"kl": 1.0}, []),
        ({"kl": 1.001}, ["kl"]),
        ({"completions/clipped_ratio": 0.5}, []),
        ({"completions/clipped_ratio": 0.5001}, ["length"]),
        ({"frac_reward_zero_std": 0.9499}, []),
        ({"frac_reward_zero_std": 0.95}, ["zero_std"]),  # >=: a step with no signal at the bound fires
        ({"kl": 2.0, "completions/clipped_ratio": 0.9, "frac_reward_zero_std": 1.0}, ["kl", "length", "zero_std"]),
        ({}, []),
    ],
)
def test_rollout_absolute_bounds(metrics, fired):
    assert checks(monitor().check_rollout(1, metrics)) == fired


def test_kl_max_event_names_value_bound_and_running_median():
    m = monitor(kl_rise=0)
    for kl in (0.1, 0.2, 0.12):
        assert m.check_rollout(1, {"kl": kl}) == []
    (event,) = m.check_rollout(4, {"kl": 1.8375})
    assert event == Event(4, "kl", "warn", "KL 1.84 > kl_max 1 (running median 0.12)",
                          {"value": 1.8375, "bound": 1.0, "median": 0.12})
    assert monitor().check_rollout(1, {"kl": 1.5})[0].values == {"value": 1.5, "bound": 1.0}  # no history yet


def test_entropy_min_fires_strictly_below_and_is_off_at_zero():
    m = monitor(entropy_min=0.25, entropy_drop=0)
    assert m.check_update(1, 1.0, 1.0, 0.25) == []
    (event,) = m.check_update(2, 1.0, 1.0, 0.2499)
    assert (event.check, event.message) == ("entropy", "entropy 0.25 < entropy_min 0.25")
    assert monitor(entropy_min=0, entropy_drop=0).check_update(1, 1.0, 1.0, 0.0) == []
    assert monitor(entropy_min=0.25).check_update(1, 1.0, 1.0, None) == []  # SFT: no entropy, no check


# --- relative checks: boundary, min_history, bounded window, fired values stay out ---------------------------------


def test_kl_rise_fires_just_above_factor_times_median_and_above_floor():
    m = monitor(min_history=3, kl_rise=5.0, kl_rise_floor=0.05)
    for _ in range(3):
        assert m.check_rollout(1, {"kl": 0.1}) == []
    assert m.check_rollout(4, {"kl": 0.5}) == []  # = 5 x 0.1: not above
    (event,) = m.check_rollout(5, {"kl": 0.51})
    assert event.message == "KL 0.51 > kl_rise 5 x running median 0.1 = 0.5"
    assert event.values == {"value": 0.51, "bound": 0.5, "median": 0.1, "factor": 5.0}
    low = monitor(min_history=3, kl_rise=5.0, kl_rise_floor=0.05)
    for _ in range(3):
        low.check_rollout(1, {"kl": 0.001})
    assert low.check_rollout(4, {"kl": 0.05}) == []  # 50 x the median, but not above the floor
    assert checks(low.check_rollout(5, {"kl": 0.0501})) == ["kl"]


def test_a_rise_from_a_median_of_zero_is_silent_and_the_history_recovers():
    m = monitor(min_history=3, window=5, kl_rise=5.0, kl_rise_floor=0.05)
    for _ in range(5):  # a PPO critic warm-up: the policy has not moved, KL is exactly 0
        assert m.check_rollout(1, {"kl": 0.0}) == []
    for _ in range(3):  # no scale to rise from: silent, and these values join the history
        assert m.check_rollout(6, {"kl": 0.3}) == []
    assert checks(m.check_rollout(9, {"kl": 1.51})) == ["kl"]  # median now 0.3: 1.51 > 5 x 0.3


def test_grad_spike_boundary_and_silence_before_min_history():
    m = monitor(min_history=3, window=5, grad_spike=2.0)
    assert feed_updates(m, [1.0, 1.0, 100.0]) == [[], [], []]  # only 2 past values when 100 came: silent
    # history [1, 1, 100], median 1: bound 2
    (event,) = m.check_update(4, 1.0, 2.001)
    assert (event.check, event.action) == ("grad_norm", "skip_step")
    assert event.message == "grad norm 2 > grad_spike 2 x running median 1 = 2"
    assert event.values == {"value": 2.001, "bound": 2.0, "median": 1.0, "factor": 2.0}
    assert Monitor.update_allowed([event]) is False
    assert m.check_update(5, 1.0, 2.0) == []  # the history is still [1, 1, 100]: at the bound, silent


def test_length_rise_boundary_and_clipped_ratio_in_one_event():
    m = monitor(min_history=2, length_rise=3.0)
    for _ in range(2):
        assert m.check_rollout(1, {"completions/mean_length": 10.0}) == []
    assert m.check_rollout(3, {"completions/mean_length": 30.0}) == []  # = 3 x 10: not above; history [10, 10, 30]
    (event,) = m.check_rollout(4, {"completions/mean_length": 30.5, "completions/clipped_ratio": 0.75})
    assert event.check == "length"
    assert event.message == ("mean length 30.5 > length_rise 3 x running median 10 = 30; "
                             "clipped ratio 0.75 > clipped_ratio_max 0.5")
    assert event.values == {"value": 30.5, "bound": 30.0, "median": 10.0, "factor": 3.0}  # the first condition's


def test_entropy_drop_boundary():
    m = monitor(min_history=2, entropy_drop=0.5)
    feed_updates(m, [1.0, 1.0], entropy=2.0)
    assert m.check_update(3, 1.0, 1.0, 1.0) == []  # = 0.5 x 2: not below; history [2, 2, 1]
    (event,) = m.check_update(4, 1.0, 1.0, 0.999)
    assert event.message == "entropy 0.999 < entropy_drop 0.5 x running median 2 = 1"
    assert (event.action, Monitor.update_allowed([event])) == ("warn", True)


def test_factor_zero_turns_a_relative_check_off():
    m = monitor(min_history=1, grad_spike=0, kl_rise=0, length_rise=0)
    feed_updates(m, [1.0])
    m.check_rollout(1, {"kl": 0.1, "completions/mean_length": 1.0})
    assert m.check_update(2, 1.0, 1e6) == []
    assert m.check_rollout(2, {"kl": 0.9, "completions/mean_length": 1e6}) == []


def test_window_is_bounded_old_values_drop_out():
    m = monitor(window=3, min_history=3, grad_spike=2.0)
    feed_updates(m, [10.0, 10.0, 10.0, 1.0, 1.0, 1.0])  # 1 < 2 x 10: nothing fires, all are recorded
    assert m.state_dict()["histories"]["grad_norm"] == [1.0, 1.0, 1.0]
    # with all six values the median would be 5.5 and 3 would pass; the window holds only the last three 1s
    assert checks(m.check_update(7, 1.0, 3.0)) == ["grad_norm"]


def test_fired_values_stay_out_of_the_history():
    m = monitor(window=3, min_history=3, grad_spike=2.0)
    feed_updates(m, [1.0, 1.0, 1.0])
    # had each 3 been recorded, the window would be [1, 3, 3] (median 3) by the third and it would pass
    assert [checks(events) for events in feed_updates(m, [3.0, 3.0, 3.0])] == [["grad_norm"]] * 3
    assert m.state_dict()["histories"]["grad_norm"] == [1.0, 1.0, 1.0]
    m.check_rollout(1, {"kl": 5.0, "completions/mean_length": 7.0, "completions/clipped_ratio": 0.9})
    histories = m.state_dict()["histories"]
    assert histories["kl"] == []  # fired kl_max
    assert histories["length"] == [7.0]  # the clipped ratio fired, not the mean length


# --- non-finite values ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("loss", "grad_norm"), [(NAN, 1.0), (1.0, INF), (-INF, NAN)])
def test_nonfinite_always_blocks_the_update_even_with_warn(loss, grad_norm):
    m = monitor(nonfinite_action="warn", min_history=1)
    feed_updates(m, [1.0], entropy=2.0)
    before = m.state_dict()
    events = m.check_update(2, loss, grad_norm, 1.9)
    assert checks(events) == ["nonfinite"]
    assert events[0].action == "warn"
    assert events[0].message == f"loss {loss:.3g}, grad norm {grad_norm:.3g}: not finite, the update is skipped"
    assert Monitor.update_allowed(events) is False
    assert m.state_dict() == before  # a skipped update records nothing, not even its finite numbers


def test_nonfinite_rollout_metrics_fire_their_check_and_are_not_recorded():
    m = monitor()
    events = m.check_rollout(3, {"kl": NAN, "completions/mean_length": INF, "frac_reward_zero_std": NAN})
    assert [(e.check, e.message) for e in events] == [
        ("kl", "KL nan is not finite"), ("length", "mean length inf is not finite"),
        ("zero_std", "frac_reward_zero_std nan is not finite")]
    assert m.state_dict()["histories"] == {"entropy": [], "grad_norm": [], "kl": [], "length": []}


def test_event_to_dict_is_strict_json():
    event = monitor().check_update(7, NAN, INF)[0]
    line = json.dumps(event.to_dict(), allow_nan=False)
    assert json.loads(line) == {"step": 7, "check": "nonfinite", "action": "skip_step",
                                "message": "loss nan, grad norm inf: not finite, the update is skipped",
                                "values": {"loss": "nan", "grad_norm": "inf"}}


# --- actions --------------------------------------------------------------------------------------------------------


def test_events_are_sorted_by_check_and_carry_their_configured_action():
    m = monitor(kl_action="rollback", length_action="skip_step", zero_std_action="stop")
    events = m.check_rollout(2, {"frac_reward_zero_std": 1.0, "kl": 3.0, "completions/clipped_ratio": 1.0})
    assert [(e.check, e.action, e.step) for e in events] == [
        ("kl", "rollback", 2), ("length", "skip_step", 2), ("zero_std", "stop", 2)]
    assert Monitor.worst(events) == "stop"


@pytest.mark.parametrize(
    ("actions", "worst", "allowed"),
    [
        ([], None, True),
        (["warn", "warn"], "warn", True),
        (["warn", "skip_step"], "skip_step", False),
        (["rollback", "skip_step", "warn"], "rollback", False),
        (["skip_step", "stop", "rollback"], "stop", False),
    ],
)
def test_worst_and_update_allowed(actions, worst, allowed):
    events = [Event(1, "kl", action, "", {}) for action in actions]
    assert Monitor.worst(events) == worst
    assert Monitor.update_allowed(events) is allowed


def test_on_rollback_halves_lr_scale_and_refuses_beyond_max_rollbacks():
    m = monitor(max_rollbacks=3)
    assert (m.lr_scale, m.rollbacks) == (1.0, 0)
    assert [m.on_rollback() for _ in range(4)] == [True, True, True, False]
    assert (m.lr_scale, m.rollbacks) == (0.0625, 4)
    m = monitor(rollback_lr_factor=0.1, max_rollbacks=0)
    assert m.on_rollback() is False


def test_rollback_becomes_stop_once_max_rollbacks_are_used():
    m = monitor(kl_action="rollback", max_rollbacks=1)
    assert m.check_rollout(1, {"kl": 2.0})[0].action == "rollback"
    assert m.on_rollback() is True
    (event,) = m.check_rollout(2, {"kl": 2.0})
    assert (event.action, event.message) == ("stop", "KL 2 > kl_max 1 (max_rollbacks 1 used: stop)")


def test_disabled_monitor_fires_and_records_nothing():
    m = monitor(enabled=False, min_history=1)
    assert m.check_rollout(1, {"kl": INF, "completions/clipped_ratio": 1.0, "frac_reward_zero_std": 1.0}) == []
    assert m.check_update(1, NAN, NAN, 0.0) == []
    assert feed_updates(m, [1.0, 1e9], entropy=1.0) == [[], []]
    assert m.state_dict() == monitor().state_dict()


# --- resume ---------------------------------------------------------------------------------------------------------


def _run(m: Monitor, start: int) -> list[dict]:
    """A fixed stretch of rollouts and updates; the events it produces, as JSON lines."""
    events = []
    for step in range(start, start + 6):
        events += m.check_rollout(step, {"kl": 0.1 * step, "completions/mean_length": 10.0 + step,
                                         "completions/clipped_ratio": 0.1, "frac_reward_zero_std": 0.5})
        grad_norm = 20.0 if step % 5 == 4 else 1.0 + (step % 3) * 2.0
        events += m.check_update(step, 1.0, grad_norm, 2.0 / step)
    return [e.to_dict() for e in events]


def test_state_dict_round_trip_through_json_resumes_exactly():
    config = MonitorConfig(window=4, min_history=2, grad_spike=2.0, kl_rise=1.5, length_rise=1.05, entropy_drop=0.8)
    original = Monitor(config)
    _run(original, 1)
    original.on_rollback()
    state = json.loads(json.dumps(original.state_dict()))
    resumed = Monitor(config)
    resumed.load_state_dict(state)
    expected = _run(original, 7)
    assert expected  # the stretch does fire, so the history decides what it reports
    assert _run(resumed, 7) == expected
    assert resumed.state_dict() == original.state_dict()
    assert (resumed.lr_scale, resumed.rollbacks) == (0.5, 1)
    assert _run(Monitor(config), 7) != expected  # a fresh monitor would not behave the same


# --- config ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kl_action": "rolback"},
         "config key 'monitor.kl_action' has unknown value 'rolback' (did you mean 'rollback'?)"),
        ({"grad_action": "skip"},
         "config key 'monitor.grad_action' has unknown value 'skip' (did you mean 'skip_step'?)"),
        ({"zero_std_action": "halt"},
         "config key 'monitor.zero_std_action' has unknown value 'halt' (valid: rollback, skip_step, stop, warn)"),
        ({"window": 0}, "config key 'monitor.window' must be >= 1, got 0"),
        ({"min_history": 0}, "config key 'monitor.min_history' must be >= 1, got 0"),
        ({"window": 4, "min_history": 5}, "config key 'monitor.min_history' must be <= monitor.window (4), got 5"),
        ({"kl_max": -1.0}, "config key 'monitor.kl_max' must be >= 0, got -1.0"),
        ({"entropy_drop": math.nan}, "config key 'monitor.entropy_drop' must be >= 0, got nan"),
        ({"rollback_lr_factor": 0.0}, "config key 'monitor.rollback_lr_factor' must be in (0, 1], got 0.0"),
        ({"rollback_lr_factor": 1.5}, "config key 'monitor.rollback_lr_factor' must be in (0, 1], got 1.5"),
        ({"max_rollbacks": -1}, "config key 'monitor.max_rollbacks' must be >= 0, got -1"),
    ],
)
def test_config_errors_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ValueError) as err:
        MonitorConfig(**overrides)
    assert str(err.value) == message


def test_config_edge_values_are_valid():
    config = MonitorConfig(window=1, min_history=1, rollback_lr_factor=1.0, max_rollbacks=0, kl_max=0.0)
    assert Monitor(config).check_rollout(1, {"kl": 0.0}) == []
