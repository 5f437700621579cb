"""Specs for posttrain.report: loading a live run directory (latest row per step, non-finite strings,
a cut-off last line), the pieces of the plots and the page, and whole reports of an RL-like and an
SFT-like run written by hand."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import pytest
from matplotlib.image import imread

from posttrain.report import (
    PANELS,
    eval_section,
    load_events,
    load_metrics,
    load_samples,
    matching_keys,
    moving_average,
    plot_panel,
    shorten,
    smoothing_window,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT_SHAPE = (540, 960, 4)  # 8 × 4.5 inches at 120 dpi, RGBA
EVENTS = [
    {"step": 12, "check": "kl", "action": "warn", "message": "KL 1.8 above kl_max 1.0",
     "values": {"value": 1.8, "bound": 1.0}},
    {"step": 30, "check": "grad_norm", "action": "rollback", "message": "grad norm 412 > 10 x median 3.1",
     "values": {"value": "inf", "bound": 31.0}},
]
PROMPT_LT = "Is 3 < 4? Answer in <answer></answer> tags."


def write_jsonl(path: Path, rows: list, tail: str = "") -> None:
    """Rows as JSON lines (a str row is written verbatim), then ``tail`` (a line cut off mid-write)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows) + tail)


def rl_row(step: int, branch: float) -> dict:
    """A training row whose reward tells the branch apart: step/100 (first try) or + 0.5 (after rollback)."""
    row = {"step": step, "reward": step / 100 + branch, "reward_std": 0.1, "rewards/format/mean": 0.9,
           "rewards/format/std": 0.1, "rewards/format/failures": 0.0, "rewards/correct/mean": step / 100,
           "frac_reward_zero_std": 0.2, "kl": 0.01 * step, "kl_coef": 0.04, "entropy": 2.0 - step / 50,
           "clip_ratio/low_mean": 0.01, "clip_ratio/high_mean": 0.02, "clip_ratio/region_mean": 0.03,
           "policy_loss": -0.01, "grad_norm": 0.5 + step / 10, "learning_rate": 1e-5,
           "completions/mean_length": 50.0 + step, "completions/min_length": 10.0, "completions/max_length": 96.0,
           "completions/clipped_ratio": 0.1, "timing_s/gen": 1.0, "timing_s/reward": 0.01, "timing_s/ref": 0.2,
           "timing_s/update": 0.8, "timing_s/step": 2.01, "throughput/gen_tokens_per_s": 900.0}
    if step % 20 == 0:
        row.update({"eval/pass@1": step / 100, "eval/pass@8": step / 50, "eval/maj@8": step / 80})
    return row


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory) -> Path:
    """40 RL steps: eval at 0/20/40, a warn at 12, a rollback at 30 that re-runs 26..40, kl 'nan' at
    35, grad_norm 'inf' at 36, a cut-off last line; samples at steps 10 and 40; config.yaml."""
    run = tmp_path_factory.mktemp("rl_run")
    rows = [{"step": 0, "eval/pass@1": 0.05, "eval/pass@8": 0.2, "eval/maj@8": 0.1}]
    rows += [rl_row(step, 0.0) for step in range(1, 31)] + [rl_row(step, 0.5) for step in range(26, 41)]
    rows[-6]["kl"], rows[-5]["grad_norm"] = "nan", "inf"  # steps 35 and 36
    write_jsonl(run / "metrics.jsonl", rows, tail='{"step": 41, "reward": 0.4')
    write_jsonl(run / "events.jsonl", EVENTS)
    samples = [{"step": 10, "prompt": PROMPT_LT if i == 0 else f"first prompt {i}", "completion": "x" * 2000,
                "reward": 0.0, "advantage": -0.5, "rewards": {"format": 1.0, "correct": None}} for i in range(2)]
    samples += [{"step": 40, "prompt": f"last prompt {i}", "completion": f"#### {i}", "reward": "nan",
                 "advantage": 0.25, "rewards": {"format": 1.0, "correct": 1.0}} for i in range(5)]
    write_jsonl(run / "samples.jsonl", samples)
    (run / "config.yaml").write_text("algorithm: grpo\nsteps: 50\nmodel:\n  path: runs/sft/checkpoints/final\n")
    return run


# --- loading ----------------------------------------------------------------------------------


def test_load_metrics_keeps_the_later_row_of_a_repeated_step(rl_run):
    rows = load_metrics(rl_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(41))  # 41 (cut off) ignored, 26..30 once
    by_step = {r["step"]: r for r in rows}
    assert by_step[25]["reward"] == 0.25  # before the rollback point: the first try
    assert by_step[26]["reward"] == 0.26 + 0.5  # re-run after the rollback: the later row stands
    assert by_step[30]["reward"] == 0.30 + 0.5
    assert by_step[0] == {"step": 0, "eval/pass@1": 0.05, "eval/pass@8": 0.2, "eval/maj@8": 0.1}
    assert math.isnan(by_step[35]["kl"]) and by_step[36]["grad_norm"] == math.inf


def test_load_metrics_drops_steps_the_restart_did_not_reach(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_jsonl(path, [{"step": 1, "a": 1}, {"step": 2, "a": 2}, {"step": 3, "a": 3}, {"step": 2, "a": 20},
                       {"step": 3, "a": "-inf"}, {"step": 3, "a": 30}])
    assert load_metrics(path) == [{"step": 1, "a": 1}, {"step": 2, "a": 20}, {"step": 3, "a": 30}]


def test_a_broken_line_before_the_last_raises_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_jsonl(path, [{"step": 1}, "", '{"step": 2, "reward": 0.', {"step": 3}])
    with pytest.raises(ValueError, match=rf"^{path}:3: not valid JSON"):
        load_metrics(path)
    write_jsonl(path, [{"step": 1}, {"reward": 0.5}, {"step": 3}])
    with pytest.raises(ValueError, match=rf"^{path}:2: expected a JSON object with an integer 'step'"):
        load_metrics(path)


def test_missing_metrics_raise_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no metrics file at {tmp_path / 'metrics.jsonl'}"):
        load_metrics(tmp_path / "metrics.jsonl")
    with pytest.raises(FileNotFoundError, match=f"looked for {tmp_path / 'metrics.jsonl'}"):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_events_and_samples_load_with_floats_restored(rl_run, tmp_path):
    events = load_events(rl_run / "events.jsonl")
    assert [(e["step"], e["action"]) for e in events] == [(12, "warn"), (30, "rollback")]
    assert events[1]["values"] == {"value": math.inf, "bound": 31.0}
    samples = load_samples(rl_run / "samples.jsonl")
    assert [s["step"] for s in samples] == [10, 10, 40, 40, 40, 40, 40]
    assert math.isnan(samples[-1]["reward"]) and samples[0]["rewards"] == {"format": 1.0, "correct": None}
    assert load_events(tmp_path / "events.jsonl") == [] and load_samples(tmp_path / "samples.jsonl") == []


# --- pieces -----------------------------------------------------------------------------------


def test_moving_average_is_a_trailing_mean_over_finite_values():
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert moving_average([1.0, math.nan, 3.0, 5.0], 3) == [1.0, 1.0, 2.0, 4.0]
    assert math.isnan(moving_average([math.nan, 2.0], 1)[0])
    assert [smoothing_window(n) for n in (5, 29, 30, 120, 2000)] == [1, 2, 3, 12, 50]


def test_matching_keys_in_pattern_then_natural_order():
    rows = [{"step": 1, "eval/pass@16": 0, "eval/pass@2": 0, "eval/maj@8": 0, "reward": 0, "rewards/b/mean": 0},
            {"step": 2, "rewards/a/mean": 0, "eval/pass@1": 0}]
    assert matching_keys(rows, ("eval/pass@*", "eval/maj@*")) == ["eval/pass@1", "eval/pass@2", "eval/pass@16",
                                                                 "eval/maj@8"]
    assert matching_keys(rows, ("reward", "rewards/*/mean", "reward")) == ["reward", "rewards/a/mean",
                                                                          "rewards/b/mean"]


def test_shorten_keeps_head_and_tail():
    assert shorten("abcdef", 6) == "abcdef"
    assert shorten("0123456789" * 3, 9) == "012345 … [21 characters cut] … 789"


def test_plot_panel_marks_each_action_once_and_skips_panels_without_data(rl_run):
    rows, events = load_metrics(rl_run / "metrics.jsonl"), load_events(rl_run / "events.jsonl")
    kl = next(p for p in PANELS if p.name == "kl")
    fig = plot_panel(kl, rows, events)
    ax = fig.axes[0]
    assert (ax.get_title(), ax.get_xlabel(), fig.axes[1].get_ylabel()) == ("KL to the reference", "step",
                                                                           "KL coefficient")
    labels = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert labels == ["kl (avg of 4)", "kl_coef (avg of 4)", "event: warn", "event: rollback"]
    assert sorted(line.get_xdata()[0] for line in ax.lines if len(line.get_xdata()) == 2) == [12, 30]  # axvlines
    assert plot_panel(kl, [{"step": 1, "loss": 2.0}], events) is None


def test_eval_section_shows_first_and_final_evaluation(rl_run):
    section = eval_section(load_metrics(rl_run / "metrics.jsonl"))
    assert section.title == "Evaluation (final: step 40)"
    assert section.table == (["metric", "step 0", "step 40"], [["eval/pass@1", "0.05", "0.4"],
                                                                ["eval/pass@8", "0.2", "0.8"],
                                                                ["eval/maj@8", "0.1", "0.5"]])
    assert eval_section([{"step": 1, "loss": 1.0}]) is None


# --- whole reports ----------------------------------------------------------------------------


def assert_plots(out: Path, names: set[str]) -> None:
    assert {p.stem for p in out.glob("*.png")} == names
    for name in names:
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE
        assert imread(out / f"{name}.png").shape == PLOT_SHAPE


def test_rl_report(rl_run):
    index = write_report(rl_run)
    out = rl_run / "report"
    assert index == out / "index.html"
    assert_plots(out, {"reward", "eval", "kl", "entropy", "grad_norm", "lengths", "clipping", "learning_rate",
                       "loss", "timing", "throughput"})
    page, md = index.read_text(), (out / "report.md").read_text()
    for event in EVENTS:
        cells = (event["step"], event["check"], event["action"], html.escape(event["message"]))
        assert "".join(f"<td>{cell}</td>" for cell in cells) in page
        assert "| " + " | ".join(map(str, cells)) + " |" in md
    assert html.escape(PROMPT_LT) in page and html.escape(PROMPT_LT, quote=False) in md
    assert "<answer>" not in page and "<answer>" not in md
    for text in ("first prompt 1", "last prompt 0", "last prompt 3", "<img src='reward.png'", "grpo",
                 "40 of 50", "still going", "1 warn, 1 rollback", "Samples at step 10", "Samples at step 40"):
        assert text in page
    assert "last prompt 4" not in page  # four samples per step
    assert "[1400 characters cut]" in page  # the 2000-character completion, shortened to 600
    assert "![Reward](reward.png)" in md and "format: 1, correct: —" in md


def test_sft_report_into_another_dir(tmp_path):
    run = tmp_path / "sft"
    (run / "checkpoints" / "final").mkdir(parents=True)
    rows = [{"step": s, "loss": 3.0 / s, "grad_norm": 1.0 / s, "learning_rate": 1e-3, "timing_s/step": 0.1}
            for s in range(1, 11)]
    rows[4].update({"eval/pass@1": 0.1, "eval/pass@8": 0.4})
    rows[9].update({"eval/pass@1": 0.3, "eval/pass@8": 0.7})
    write_jsonl(run / "metrics.jsonl", rows)
    index = write_report(run, tmp_path / "out")
    assert index == tmp_path / "out" / "index.html" and not (run / "report").exists()
    assert_plots(tmp_path / "out", {"eval", "grad_norm", "learning_rate", "loss", "timing"})
    page = index.read_text()
    for text in ("finished (checkpoints/final exists)", "No health events.", "Evaluation (final: step 10)",
                 "<th>step 5</th><th>step 10</th>", "<td>eval/pass@8</td><td>0.4</td><td>0.7</td>"):
        assert text in page
    assert "Samples at step" not in page
