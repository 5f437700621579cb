"""Specs for ``posttrain.metrics``: resumable JSONL logs, the progress bar's start, and the optional
TensorBoard / W&B sinks (W&B through a fake module: no network, no account)."""

from __future__ import annotations

import importlib.util
import math
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from posttrain.metrics import JsonlWriter, StepProgress, numeric_scalars, open_sinks, read_jsonl

ROW_1 = b'{"step": 1, "loss": 0.5}\n'  # what JsonlWriter writes for {"step": 1, "loss": 0.5}: 25 bytes
ROW_2 = b'{"step": 2, "loss": 0.25}\n'
ROW_3 = b'{"step": 3, "loss": 0.125}\n'
LEFT_OUT = ": left out, metrics still go to metrics.jsonl"
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="tensorboard not installed (it is in the dev extra)")


def write_rows(writer: JsonlWriter, *steps: int) -> None:
    for step in steps:
        writer.write({"step": step, "loss": 0.5**step})


# --- JsonlWriter / read_jsonl -------------------------------------------------------------------


def test_position_is_the_byte_length_after_each_write(tmp_path):
    writer = JsonlWriter(tmp_path / "m.jsonl")
    assert writer.position == 0
    write_rows(writer, 1)
    assert writer.position == len(ROW_1) == 25
    write_rows(writer, 2)
    assert writer.position == len(ROW_1 + ROW_2) == (tmp_path / "m.jsonl").stat().st_size
    writer.close()


def test_truncate_at_drops_the_rows_after_the_checkpoint_and_the_resumed_run_writes_them_again(tmp_path):
    path = tmp_path / "m.jsonl"
    writer = JsonlWriter(path)
    write_rows(writer, 1)
    checkpoint = writer.position  # saved with the checkpoint of step 1
    write_rows(writer, 2, 3)
    writer.close()  # the run dies after step 3

    resumed = JsonlWriter(path, truncate_at=checkpoint)
    assert path.read_bytes() == ROW_1  # cut exactly, before anything is written
    assert resumed.position == checkpoint
    write_rows(resumed, 2, 3)
    resumed.close()
    assert path.read_bytes() == ROW_1 + ROW_2 + ROW_3
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]


def test_truncate_at_zero_empties_and_none_appends(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(ROW_1)
    JsonlWriter(path, truncate_at=None).close()
    assert path.read_bytes() == ROW_1
    writer = JsonlWriter(path, truncate_at=0)
    write_rows(writer, 2)
    writer.close()
    assert path.read_bytes() == ROW_2
    JsonlWriter(tmp_path / "new.jsonl", truncate_at=0).close()  # a missing file is 0 bytes: fine
    assert (tmp_path / "new.jsonl").read_bytes() == b""


def test_a_file_shorter_than_truncate_at_is_an_error_and_stays_untouched(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(ROW_1)
    with pytest.raises(ValueError) as error:
        JsonlWriter(path, truncate_at=100)
    assert str(error.value) == (f"cannot resume {path}: it has 25 bytes, fewer than the 100 bytes the checkpoint "
                                "recorded (the file was replaced or cut since)")
    assert path.read_bytes() == ROW_1
    with pytest.raises(ValueError, match="it has 0 bytes, fewer than the 7 bytes"):
        JsonlWriter(tmp_path / "missing.jsonl", truncate_at=7)
    assert not (tmp_path / "missing.jsonl").exists()


@pytest.mark.parametrize("tail", [b'{"step": 3, "lo', '{"note": "caf\u00e9"}'.encode()[:-3]])  # mid-row, mid-character
def test_read_jsonl_skips_a_cut_off_last_line(tmp_path, tail):
    path = tmp_path / "m.jsonl"
    path.write_bytes(ROW_1 + ROW_2 + tail)
    assert read_jsonl(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]


def test_read_jsonl_keeps_a_complete_last_line_without_newline_and_skips_blank_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(ROW_1 + b"\n" + ROW_2.rstrip())
    assert read_jsonl(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]


@pytest.mark.parametrize(("text", "line"), [(ROW_1 + b'{"step": 2\n' + ROW_3, 2), (ROW_1 + ROW_2 + b"{oops\n", 3)])
def test_read_jsonl_rejects_a_broken_line_that_was_finished(tmp_path, text, line):
    path = tmp_path / "m.jsonl"
    path.write_bytes(text)
    with pytest.raises(ValueError, match=rf"^{path}: line {line} is not valid JSON \("):
        read_jsonl(path)


# --- StepProgress ---------------------------------------------------------------------------------


def test_a_resumed_progress_bar_starts_at_the_steps_already_done(capsys):
    with StepProgress("rl", 10, ("reward",), initial=7) as bar:
        bar.update({"reward": 0.5, "kl": 0.1})
    out = capsys.readouterr().out
    assert "8/10" in out and "reward=0.5" in out and "kl=" not in out


# --- sinks ----------------------------------------------------------------------------------------


def test_numeric_scalars_keeps_numbers_as_floats_and_drops_the_rest():
    metrics = {"step": 3, "n": 2, "ok": True, "t": torch.tensor(0.5), "kl": float("inf"), "note": "x",
               "none": None, "vector": torch.tensor([1.0, 2.0]), "list": [1]}
    assert numeric_scalars(metrics) == {"n": 2.0, "ok": 1.0, "t": 0.5, "kl": math.inf}


def open_one(name: str, run_dir: Path, start_step: int = 0, env: dict | None = None):
    """``open_sinks([name], ...)`` → (sinks, notices)."""
    notices: list[str] = []
    sinks = open_sinks([name], run_dir, "run-a", "proj", {"lr": 0.1}, start_step, notices.append, env=env or {})
    return sinks, notices


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@needs_tensorboard
def test_tensorboard_sink_writes_scalars_readable_back(tmp_path):
    (sink,), notices = open_one("tensorboard", tmp_path)
    for step in (1, 2, 3):  # values exact in float32, as event files store them
        sink.write(step, {"step": step, "reward": step / 4, "eval/pass@1": torch.tensor(0.5 * step), "note": "x",
                          "none": None})
    sink.write(4, {"step": 4, "kl": float("nan")})
    sink.close()
    assert notices == []
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert sorted(scalars) == ["eval/pass@1", "kl", "reward"]
    assert scalars["reward"] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert scalars["eval/pass@1"] == [(1, 0.5), (2, 1.0), (3, 1.5)]
    assert scalars["kl"][0][0] == 4 and math.isnan(scalars["kl"][0][1])


@needs_tensorboard
def test_tensorboard_sink_of_a_resumed_run_replaces_the_events_after_its_checkpoint(tmp_path):
    (first,), _ = open_one("tensorboard", tmp_path)
    for step in range(1, 6):  # the run gets to step 5; its last checkpoint is step 3
        first.write(step, {"reward": float(step)})
    first.close()
    # TensorBoard reads event files in name order, which starts with the second they were made: a resumed
    # run starts later than the run it continues
    time.sleep(1 - time.time() % 1)
    (resumed,), _ = open_one("tensorboard", tmp_path, start_step=3)
    for step in (4, 5):
        resumed.write(step, {"reward": 10.0 * step})
    resumed.close()
    assert tensorboard_scalars(tmp_path / "tensorboard")["reward"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0),
                                                                       (5, 50.0)]


class FakeWandb(types.ModuleType):
    """The part of ``wandb`` the sink uses: ``init`` → a run with ``log`` and ``finish``; ``api.api_key``.
    ``fail_at``: the log call (1-based) that raises."""

    def __init__(self, api_key: str | None = None, fail_at: int = 0):
        super().__init__("wandb")
        self.api = types.SimpleNamespace(api_key=api_key)
        self.inits: list[dict] = []
        self.logs: list[tuple[dict, int]] = []
        self.finished = 0
        self.fail_at = fail_at

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, metrics: dict, step: int) -> None:
        if len(self.logs) + 1 == self.fail_at:
            raise RuntimeError("quota exceeded\ntraceback details")
        self.logs.append((metrics, step))

    def finish(self) -> None:
        self.finished += 1


def test_wandb_sink_logs_and_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    (sink,), notices = open_one("wandb", tmp_path, env={"WANDB_API_KEY": "key"})
    sink.write(1, {"step": 1, "reward": 0.5, "note": "x"})
    sink.write(2, {"step": 2, "reward": 0.75})
    sink.close()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert len(run_id) == 12 and notices == []
    assert fake.inits == [{"project": "proj", "name": "run-a", "config": {"lr": 0.1}, "id": run_id,
                           "resume": "allow", "dir": str(tmp_path)}]
    assert fake.logs == [({"reward": 0.5}, 1), ({"reward": 0.75}, 2)]
    assert fake.finished == 1

    open_one("wandb", tmp_path, start_step=2, env={"WANDB_API_KEY": "key"})  # resume: same run directory
    assert fake.inits[1]["id"] == run_id
    open_one("wandb", tmp_path / "other", env={"WANDB_API_KEY": "key"})  # another run: another W&B run
    assert fake.inits[2]["id"] != run_id


@pytest.mark.parametrize(("env", "api_key"), [({"WANDB_MODE": "offline"}, None), ({"WANDB_MODE": "disabled"}, None),
                                              ({}, "stored-key")])
def test_wandb_counts_as_configured_offline_disabled_or_logged_in(tmp_path, monkeypatch, env, api_key):
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb(api_key=api_key))
    sinks, notices = open_one("wandb", tmp_path, env=env)
    assert len(sinks) == 1 and notices == []


class KeyReadFails:
    @property
    def api_key(self):
        raise OSError("netrc unreadable")


@pytest.mark.parametrize("api", [types.SimpleNamespace(api_key=None), KeyReadFails(), None])
def test_wandb_without_a_login_is_left_out_with_one_notice(tmp_path, monkeypatch, api):
    fake = FakeWandb()
    fake.api = api
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sinks, notices = open_one("wandb", tmp_path, env={"WANDB_MODE": "online"})
    assert sinks == [] and fake.inits == []
    assert notices == ["wandb not logged in (run `wandb login`, or set WANDB_API_KEY, or WANDB_MODE=offline)"
                       + LEFT_OUT]


@pytest.mark.parametrize(("name", "module"), [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_package_is_left_out_with_one_notice(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # the import fails as if it were not installed
    sinks, notices = open_one(name, tmp_path, env={"WANDB_API_KEY": "key"})
    assert sinks == []
    assert notices == [f"{name} not installed (pip install 'posttrain[logging]')" + LEFT_OUT]
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "wandb_id.txt").exists()


def test_a_sink_failing_to_start_is_left_out_with_one_notice(tmp_path, monkeypatch):
    def unreachable(**kwargs):
        raise ConnectionError("api.wandb.ai unreachable\nretrying")

    fake = FakeWandb()
    fake.init = unreachable
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sinks, notices = open_one("wandb", tmp_path, env={"WANDB_API_KEY": "key"})
    assert sinks == []
    assert notices == ["wandb failed to start (ConnectionError: api.wandb.ai unreachable)" + LEFT_OUT]


@needs_tensorboard
def test_a_sink_raising_in_write_is_dropped_after_one_notice_and_the_others_go_on(tmp_path, monkeypatch):
    fake = FakeWandb(fail_at=2)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    notices: list[str] = []
    sinks = open_sinks(["wandb", "tensorboard"], tmp_path, "run-a", "proj", {}, 0, notices.append,
                       env={"WANDB_API_KEY": "key"})
    for step in (1, 2, 3):
        for sink in sinks:
            sink.write(step, {"step": step, "reward": float(step)})
    assert notices == ["wandb failed at step 2 (RuntimeError: quota exceeded): dropped, metrics still go to "
                       "metrics.jsonl"]
    assert fake.logs == [({"reward": 1.0}, 1)] and fake.finished == 1  # closed when dropped, not written to again
    for sink in sinks:
        sink.close()
    assert fake.finished == 1 and len(notices) == 1
    assert tensorboard_scalars(tmp_path / "tensorboard")["reward"] == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_unknown_report_to_names_are_errors_naming_the_closest_and_open_nothing(tmp_path):
    with pytest.raises(ValueError) as error:
        open_sinks(["tensorboard", "tensorbord"], tmp_path, "run-a", "proj", {}, 0, print)
    assert str(error.value) == "unknown report_to name 'tensorbord' (did you mean 'tensorboard'?)"
    assert not (tmp_path / "tensorboard").exists()
    with pytest.raises(ValueError, match=r"^unknown report_to name 'comet' \(valid: tensorboard, wandb\)$"):
        open_sinks(["comet"], tmp_path, "run-a", "proj", {}, 0, print)


def test_no_report_to_opens_no_sink(tmp_path):
    assert open_sinks((), tmp_path, "run-a", "proj", {}, 0, print) == []


def test_without_a_terminal_a_plain_line_every_n_steps_and_at_the_last(capsys):
    with StepProgress("rl", 5, ("reward",), initial=0, every=2) as bar:  # pytest's stdout is not a terminal
        for step in range(5):
            bar.update({"reward": step / 10})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rl step")]
    assert [line.split("  ")[0] for line in lines] == ["rl step 2/5", "rl step 4/5", "rl step 5/5"]
    assert "reward=0.1" in lines[0] and "elapsed 0:00:00" in lines[0] and "eta " in lines[0]
    with StepProgress("rl", 2, ("reward",), quiet=True, every=1) as bar:  # a rank other than 0: nothing
        bar.update({"reward": 1.0})
    with StepProgress("rl", 2, ("reward",), every=0) as bar:  # log.every=0: no plain lines
        bar.update({"reward": 1.0})
    assert "rl step" not in capsys.readouterr().out
