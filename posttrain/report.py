"""The run report: PNG plots of a run's metrics and a page (``index.html`` and ``report.md``) around them.

``write_report(run_dir)`` reads what the trainers leave in a run directory — ``metrics.jsonl``,
``events.jsonl`` (health monitor), ``samples.jsonl``, ``config.yaml``, ``checkpoints/final`` — and
writes ``run_dir/report/``: one PNG per panel whose metrics exist, then the page: a header (config,
last step, status), the first and final evaluation, the plots, the health events and samples from
the first and the last logged step. The run may still be going: an unfinished last line is ignored.

Every time-series plot marks the health events as vertical lines coloured by action. Noisy training
curves (30 points or more) are drawn faded with a trailing moving average on top; evaluation
metrics (``eval/…``) are drawn as markers.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import yaml
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter, MaxNLocator

NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}  # how the writers keep them in JSON
ACTION_COLORS = {"warn": "tab:orange", "skip_step": "tab:purple", "rollback": "tab:red", "stop": "black"}
SAMPLES_PER_STEP = 4  # samples shown from the first and from the last logged step
MIN_WINDOW = 3  # a moving average over fewer points is not drawn (the raw curve is drawn solid)


@dataclass(frozen=True)
class Panel:
    """One plot. Curves are the metrics whose names match ``left`` / ``right`` (fnmatch patterns, in
    pattern order, natural order within a pattern); ``right`` goes on a twin y axis. ``band`` = (low
    key, high key) is shaded behind the first left curve. Drawn only when some curve has data."""

    name: str  # file stem of the PNG
    title: str
    ylabel: str
    left: tuple[str, ...]
    right: tuple[str, ...] = ()
    right_label: str = ""
    band: tuple[str, str] | None = None
    log: bool = False  # log-scale y (non-positive values are left out)


PANELS = (
    Panel("reward", "Reward", "reward", ("reward", "rewards/*/mean", "eval/reward")),
    Panel("eval", "Evaluation", "score", ("eval/pass@*", "eval/maj@*", "eval/*/pass@*")),
    Panel("kl", "KL to the reference", "KL", ("kl",), ("kl_coef",), "KL coefficient"),
    Panel("entropy", "Token entropy", "entropy (nats)", ("entropy",)),
    Panel("grad_norm", "Gradient norm (before clipping)", "grad norm", ("grad_norm",), log=True),
    Panel("lengths", "Completion length", "tokens", ("completions/mean_length", "eval/mean_length"),
          ("completions/clipped_ratio",), "clipped ratio", band=("completions/min_length", "completions/max_length")),
    Panel("clipping", "Clipped tokens and zero-variance groups", "fraction",
          ("clip_ratio/*", "frac_reward_zero_std")),
    Panel("learning_rate", "Learning rate", "learning rate", ("learning_rate",)),
    Panel("loss", "Loss", "loss", ("loss", "policy_loss"), ("value_loss",), "value loss"),
    Panel("timing", "Time per stage", "seconds per step", ("timing_s/*",)),
    Panel("throughput", "Generation throughput", "generated tokens / s", ("throughput/gen_tokens_per_s",)),
)


# --- loading ---------------------------------------------------------------------------------


def _restore(value):
    """'nan' / 'inf' / '-inf' → the float; any other value unchanged."""
    return NONFINITE[value] if isinstance(value, str) and value in NONFINITE else value


def _read_steps_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file that may still be written to: blank lines skipped, an
    unparseable last line ignored (cut off mid-write). Any other bad line — not JSON, not an object,
    no integer ``step`` — raises ValueError '<path>:<line>: …'."""
    text = path.read_bytes().decode("utf-8", errors="replace")  # a write may stop inside a character
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"{path}:{n}: expected a JSON object with an integer 'step'")
        rows.append(row)
    return rows


def _final_branch(rows: list[dict], one_per_step: bool) -> list[dict]:
    """The rows of the run as it finally is. A row whose step is below the previous row's (or equal,
    with ``one_per_step``) restarts the run there (a rollback or resume re-runs steps): the kept rows
    from that step on are dropped, so the later row for a step stands and no stale step remains."""
    kept: list[dict] = []
    for row in rows:
        while kept and (kept[-1]["step"] > row["step"] or (one_per_step and kept[-1]["step"] == row["step"])):
            kept.pop()
        kept.append(row)
    return kept


def load_metrics(path: str | Path) -> list[dict]:
    """``metrics.jsonl`` as the report reads it: one row per step, steps ascending, the later row for
    a repeated step (whole, not merged; steps logged after the repeated one and not re-run are
    dropped too, see _final_branch), "nan"/"inf"/"-inf" turned back into floats. Raises
    FileNotFoundError for a missing file and ValueError '<path>:<line>: …' for a bad line (not the last)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    rows = _final_branch(_read_steps_jsonl(path), one_per_step=True)
    return [{key: _restore(value) for key, value in row.items()} for row in rows]


def load_events(path: str | Path) -> list[dict]:
    """``events.jsonl`` (health-monitor events, all of them, in file order); [] when there is none."""
    path = Path(path)
    rows = _read_steps_jsonl(path) if path.is_file() else []
    return [{**row, "values": {k: _restore(v) for k, v in (row.get("values") or {}).items()}} for row in rows]


def load_samples(path: str | Path) -> list[dict]:
    """``samples.jsonl`` of the run as it finally is (several rows per step; see _final_branch), with
    ``reward``, ``advantage`` and the per-function ``rewards`` restored to floats; [] when there is none."""
    path = Path(path)
    rows = _final_branch(_read_steps_jsonl(path), one_per_step=False) if path.is_file() else []
    restored = []
    for row in rows:
        scores = {name: _restore(v) for name, v in (row.get("rewards") or {}).items()}
        restored.append({**row, "reward": _restore(row.get("reward")), "advantage": _restore(row.get("advantage")),
                         "rewards": scores})
    return restored


# --- series ----------------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows holding a number under ``key``; inf becomes nan (a gap when drawn)."""
    points = [(row["step"], float(row[key])) for row in rows if _is_number(row.get(key))]
    return [s for s, _ in points], [v if math.isfinite(v) else math.nan for _, v in points]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean: out[i] = mean of the finite values among values[max(0, i − window + 1) : i + 1]
    (nan when there is none), so the average starts at the first point and lags by about window/2."""
    out = []
    for i in range(len(values)):
        finite = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def smoothing_window(points: int) -> int:
    """The moving-average window for a curve of ``points`` points: a tenth of them, at most 50."""
    return max(1, min(50, points // 10))


def _natural(key: str) -> list:
    """Sort key that puts eval/pass@2 before eval/pass@16."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def matching_keys(rows: Sequence[dict], patterns: Sequence[str]) -> list[str]:
    """The metric names in ``rows`` that match ``patterns`` (fnmatch), in pattern order, natural order
    within a pattern, each once."""
    names = sorted({key for row in rows for key in row if key != "step"}, key=_natural)
    found: list[str] = []
    for pattern in patterns:
        found += [name for name in names if fnmatch(name, pattern) and name not in found]
    return found


# --- plots -----------------------------------------------------------------------------------


def _draw(ax, rows: Sequence[dict], key: str, color) -> None:
    """One curve: eval metrics as markers; training metrics raw (faded) under their moving average."""
    steps, values = series(rows, key)
    if key.startswith("eval/"):
        ax.plot(steps, values, color=color, marker="o", markersize=5, linestyle="--", linewidth=1, label=key)
        return
    window = smoothing_window(len(values))
    if window < MIN_WINDOW:
        ax.plot(steps, values, color=color, linewidth=1.5, label=key)
        return
    ax.plot(steps, values, color=color, linewidth=1, alpha=0.3)
    ax.plot(steps, moving_average(values, window), color=color, linewidth=2, label=f"{key} (avg of {window})")


def _draw_band(ax, rows: Sequence[dict], band: tuple[str, str], color) -> None:
    low, high = band
    points = [(r["step"], r[low], r[high]) for r in rows if _is_number(r.get(low)) and _is_number(r.get(high))]
    if points:
        steps, lows, highs = zip(*points, strict=True)
        ax.fill_between(steps, lows, highs, color=color, alpha=0.15, linewidth=0, label="min–max")


def _mark_events(ax, events: Sequence[dict]) -> list[Line2D]:
    """A dotted vertical line per event, coloured by action; one legend handle per action present."""
    for event in events:
        ax.axvline(event["step"], color=ACTION_COLORS.get(event.get("action"), "gray"), linestyle=":", linewidth=1.3)
    actions = dict.fromkeys(str(event.get("action")) for event in events)
    return [Line2D([], [], color=ACTION_COLORS.get(a, "gray"), linestyle=":", linewidth=1.3, label=f"event: {a}")
            for a in actions]


def plot_panel(panel: Panel, rows: Sequence[dict], events: Sequence[dict]) -> Figure | None:
    """``panel`` drawn over ``rows`` (load_metrics) with ``events`` marked; None when no curve has data."""
    left, right = matching_keys(rows, panel.left), matching_keys(rows, panel.right)
    if not any(series(rows, key)[0] for key in left + right):
        return None
    fig = Figure(figsize=(8, 4.5), dpi=120)
    # fixed margins (room for tick labels and a twin axis' label): constrained layout would draw twice
    fig.subplots_adjust(left=0.1, right=0.9 if right else 0.97, bottom=0.11, top=0.92)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = colormaps["tab10"].colors
    if panel.band and left:
        _draw_band(ax, rows, panel.band, colors[0])
    for i, key in enumerate(left):
        _draw(ax, rows, key, colors[i % len(colors)])
    axes = [ax]
    if right:
        twin = ax.twinx()
        for i, key in enumerate(right, start=len(left)):
            _draw(twin, rows, key, colors[i % len(colors)])
        twin.set_ylabel(panel.right_label)
        axes.append(twin)
    if panel.log:
        ax.set_yscale("log", nonpositive="mask")
        ax.yaxis.set_major_formatter(LogFormatter())  # '0.6', '4', '1e+04': narrower than 6×10⁻¹
        ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
    handles = [h for a in axes for h in a.get_legend_handles_labels()[0]] + _mark_events(ax, events)
    axes[-1].legend(handles=handles, fontsize="small", loc="best", framealpha=0.85)
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    return fig


def write_plots(rows: Sequence[dict], events: Sequence[dict], out_dir: Path,
                panels: Sequence[Panel] = PANELS) -> list[tuple[str, str]]:
    """Save each panel with data as ``out_dir/<name>.png``; returns [(file name, title)] of those saved."""
    saved = []
    for panel in panels:
        fig = plot_panel(panel, rows, events)
        if fig is not None:
            fig.savefig(out_dir / f"{panel.name}.png")
            saved.append((f"{panel.name}.png", panel.title))
    return saved


# --- the page --------------------------------------------------------------------------------


@dataclass
class Section:
    """A part of the page: a heading, then optional text, a table (header, rows of cells) and images."""

    title: str
    text: str = ""
    table: tuple[list[str], list[list[str]]] | None = None
    images: list[tuple[str, str]] = field(default_factory=list)  # (file, caption)


def fmt(value) -> str:
    """A cell: floats to 4 significant digits, None as an em dash, anything else as str."""
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def shorten(text: str, limit: int) -> str:
    """``text`` if at most ``limit`` characters, else its first two thirds and last third of ``limit``
    around a note of how much was cut (the end of a completion holds its answer)."""
    if len(text) <= limit:
        return text
    head, tail = limit * 2 // 3, limit // 3
    return f"{text[:head]} … [{len(text) - head - tail} characters cut] … {text[len(text) - tail:]}"


def run_status(run_dir: Path, events: Sequence[dict]) -> str:
    """'finished' when checkpoints/final exists, else whether the health monitor stopped it, else
    'still going (or interrupted)'."""
    if (run_dir / "checkpoints" / "final").exists():
        return "finished (checkpoints/final exists)"
    stops = [e["step"] for e in events if e.get("action") == "stop"]
    if stops:
        return f"stopped by the health monitor at step {stops[-1]}"
    return "still going (or interrupted): no checkpoints/final yet"


def _read_config(path: Path) -> dict:
    config = yaml.safe_load(path.read_text()) if path.is_file() else None
    return config if isinstance(config, dict) else {}


def _dotted(config: dict, key: str):
    """config["a"]["b"] for key 'a.b'; None when any part is missing."""
    value = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def header_section(run_dir: Path, config: dict, rows: Sequence[dict], events: Sequence[dict]) -> Section:
    """The run at a glance: directory, algorithm / model / task / planned steps (config.yaml), last
    step reached, status and the number of health events per action."""
    facts = [("run directory", str(run_dir))]
    facts += [(key, fmt(value)) for key in ("algorithm", "steps", "model.path", "task.name")
              if (value := _dotted(config, key)) is not None]
    last = rows[-1]["step"] if rows else None
    planned = config.get("steps")
    facts.append(("last step", f"{fmt(last)} of {planned}" if last is not None and planned else fmt(last)))
    facts.append(("status", run_status(run_dir, events)))
    counts = Counter(str(e.get("action")) for e in events)
    facts.append(("health events", ", ".join(f"{n} {a}" for a, n in counts.items()) or "none"))
    return Section("Run", table=(["", ""], [list(fact) for fact in facts]))


def eval_section(rows: Sequence[dict]) -> Section | None:
    """The ``eval/…`` numbers of the first and the last evaluated step side by side (one column when
    they are the same step); None when nothing was evaluated."""
    evaluated = [row for row in rows if any(key.startswith("eval/") for key in row)]
    if not evaluated:
        return None
    shown = [evaluated[0], evaluated[-1]] if len(evaluated) > 1 else evaluated
    keys = matching_keys(evaluated, ("eval/pass@*", "eval/maj@*", "eval/*"))
    table = [[key, *(fmt(row.get(key)) for row in shown)] for key in keys]
    return Section(f"Evaluation (final: step {evaluated[-1]['step']})",
                   table=(["metric", *(f"step {row['step']}" for row in shown)], table))


def events_section(events: Sequence[dict]) -> Section:
    if not events:
        return Section("Health events", text="No health events.")
    table = [[fmt(e["step"]), fmt(e.get("check")), fmt(e.get("action")), fmt(e.get("message"))] for e in events]
    return Section("Health events", table=(["step", "check", "action", "message"], table))


def sample_sections(samples: Sequence[dict], per_step: int = SAMPLES_PER_STEP) -> list[Section]:
    """Up to ``per_step`` samples from the first and from the last logged step: prompt, completion
    (shortened), reward, advantage and the per-function rewards."""
    if not samples:
        return []
    columns = ["prompt", "completion", "reward", "advantage", "per reward"]
    sections = []
    for step in dict.fromkeys((samples[0]["step"], samples[-1]["step"])):
        chosen = [s for s in samples if s["step"] == step][:per_step]
        table = [[shorten(str(s.get("prompt", "")), 300), shorten(str(s.get("completion", "")), 600),
                  fmt(s["reward"]), fmt(s["advantage"]), ", ".join(f"{k}: {fmt(v)}" for k, v in s["rewards"].items())]
                 for s in chosen]
        sections.append(Section(f"Samples at step {step}", table=(columns, table)))
    return sections


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;text-align:left;white-space:pre-wrap;max-width:600px}th{background:#f3f3f3}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}
figure{margin:0}img{width:100%}figcaption{font-size:small;color:#555}"""


def render_html(title: str, sections: Sequence[Section]) -> str:
    """A self-contained page (inline CSS, images by relative path); every text HTML-escaped."""
    e = html.escape
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{e(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{e(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{e(section.text)}</p>")
        if section.table:
            head, body = section.table
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>" for row in body]
            parts.append("</table>")
        if section.images:
            parts.append("<div class='plots'>")
            parts += [f"<figure><img src='{e(src)}' alt='{e(cap)}'><figcaption>{e(cap)}</figcaption></figure>"
                      for src, cap in section.images]
            parts.append("</div>")
    return "\n".join([*parts, "</body></html>\n"])


def _md_cell(text: str) -> str:
    """A Markdown table cell: HTML-escaped (so '<answer>' shows), '|' escaped, newlines as <br>."""
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", "<br>")


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    """The same page as GitHub-flavoured Markdown, images by relative path."""
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"## {section.title}")
        if section.text:
            parts.append(section.text)
        if section.table:
            head, body = section.table
            lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in body]
            parts.append("\n".join(lines))
        parts += [f"![{cap}]({src})" for src, cap in section.images]
    return "\n\n".join(parts) + "\n"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, panels: Sequence[Panel] = PANELS) -> Path:
    """Write the run report of ``run_dir`` into ``out_dir`` (default ``run_dir/report``): the PNGs of
    ``panels`` that have data, ``index.html`` and ``report.md``; returns the index.html path.
    Raises FileNotFoundError when ``run_dir`` has no metrics.jsonl."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in run directory {run_dir} (looked for {metrics_path})")
    rows = load_metrics(metrics_path)
    events = load_events(run_dir / "events.jsonl")
    samples = load_samples(run_dir / "samples.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    sections = [header_section(run_dir, _read_config(run_dir / "config.yaml"), rows, events)]
    sections += [s for s in [eval_section(rows)] if s is not None]
    sections.append(Section("Plots", images=write_plots(rows, events, out, panels)))
    sections += [events_section(events), *sample_sections(samples)]
    title = f"Run report: {run_dir.resolve().name}"
    (out / "report.md").write_text(render_markdown(title, sections), encoding="utf-8")
    index = out / "index.html"
    index.write_text(render_html(title, sections), encoding="utf-8")
    return index
