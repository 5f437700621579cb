"""``posttrain eval``: sample K completions per problem, grade each with the task, write one JSON line
per problem, and report (the GSM8K practice's table, over all P·K samples):

- **Correct format**: samples whose answer can be read in the task's required format (``grade["format"]``);
- **Plausibly correct**: samples whose last number is the gold (flexible extraction; ``grade["plausible"]``);
- **Exact correct**: samples whose required-format answer equals the gold, i.e. reward 1 (``grade["exact"]``);
- **input / output tokens**: prompt tokens per problem and completion tokens per sample (the stop token
  counted, as generated), average and maximum;
- **pass@k** = mean over problems of 1 − C(K − c, k) / C(K, k), c = a problem's exact samples, for
  k = 1, 2, 4, … below K and K itself (``report_ks``);
- **maj@K** = share of problems whose majority vote over the K format-extracted answers is the gold.

Everything but ``load_eval`` / ``run_eval`` is a pure function of the per-problem records, so a report
can be recomputed from the JSONL alone: ``summarize(metrics.read_jsonl(path))``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path

from rich.table import Table

from posttrain.checkpoint import load_policy
from posttrain.config import LoraConfig, ModelConfig, TaskConfig, suggest
from posttrain.distributed import World
from posttrain.engine import Engine, SamplingParams, completion_text
from posttrain.evaluation import SampleFailures, maj_at_k, pass_at_k
from posttrain.metrics import StepProgress
from posttrain.random_streams import group_seed
from posttrain.tasks import make_task
from posttrain.tools import default_registry
from posttrain.trainers.model_engine import resolve_device

SPLITS = ("test", "train")
FLAGS = (("format", "Correct format"), ("plausible", "Plausibly correct"), ("exact", "Exact correct"))
FAILED_GRADE = {"answer": None, "format": False, "plausible": False, "exact": False}  # a grade that raised
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name: tried on the hub when no such local path


# --- the report: pure functions of the per-problem records ------------------------------------


def report_ks(samples: int) -> list[int]:
    """The k of pass@k: 1, 2, 4, … below ``samples``, then ``samples``: report_ks(6) = [1, 2, 4, 6]."""
    ks, k = [], 1
    while k < samples:
        ks.append(k)
        k *= 2
    return [*ks, samples]


def problem_scores(exact: Sequence[bool], answers: Sequence[str | None], gold: str) -> dict[str, float]:
    """One problem's ``pass@k`` for k in report_ks(n) (unbiased, c = exact samples of n) and ``maj@n``
    (1.0 when the majority of the n answers is ``gold``, compared as strings; None casts no vote)."""
    n, c = len(exact), sum(bool(x) for x in exact)
    scores = {f"pass@{k}": pass_at_k(n, c, k) for k in report_ks(n)}
    scores[f"maj@{n}"] = maj_at_k(answers, gold, n)
    return scores


def problem_record(question: str, gold: str, prompt_tokens: int, completions: Sequence[str],
                   completion_tokens: Sequence[int], grades: Sequence[Mapping]) -> dict:
    """The JSON line of one problem: its question, gold, prompt token count, the K completions with
    their token counts, extracted ``answers`` and ``format`` / ``plausible`` / ``exact`` flags (one per
    sample, from the task's ``grade``), and the problem's ``pass@k`` and ``maj@K``."""
    record = {
        "question": question,
        "gold": gold,
        "prompt_tokens": prompt_tokens,
        "completions": list(completions),
        "completion_tokens": list(completion_tokens),
        "answers": [g["answer"] for g in grades],
        **{flag: [bool(g[flag]) for g in grades] for flag, _ in FLAGS},
    }
    record.update(problem_scores(record["exact"], record["answers"], gold))
    return record


def summarize(records: Sequence[Mapping]) -> dict[str, float]:
    """The report over ``records`` (problem_record's dicts, each with the same number K of samples):

    ``problems``, ``samples`` (P·K); ``format``, ``plausible``, ``exact``: sample counts, each with
    ``<flag>_pct`` = 100 · count / samples; ``input_tokens_avg|max`` over problems,
    ``output_tokens_avg|max`` over samples; ``pass@k`` (k in report_ks(K)) and ``maj@K``, means over
    problems. Raises ValueError for no records or records with different K.
    """
    if not records:
        raise ValueError("summarize needs at least one problem record")
    k = len(records[0]["exact"])
    if k < 1 or any(len(r["exact"]) != k for r in records):
        counts = [len(r["exact"]) for r in records]
        raise ValueError(f"every problem needs the same number (>= 1) of samples; got {counts}")
    total = k * len(records)
    report: dict[str, float] = {"problems": len(records), "samples": total}
    for flag, _ in FLAGS:
        report[flag] = sum(sum(bool(x) for x in r[flag]) for r in records)
        report[f"{flag}_pct"] = 100.0 * report[flag] / total
    prompt = [r["prompt_tokens"] for r in records]  # (P,)
    output = [n for r in records for n in r["completion_tokens"]]  # (P·K,)
    report.update(input_tokens_avg=sum(prompt) / len(prompt), input_tokens_max=max(prompt),
                  output_tokens_avg=sum(output) / len(output), output_tokens_max=max(output))
    scores = [problem_scores(r["exact"], r["answers"], r["gold"]) for r in records]
    report.update({key: sum(s[key] for s in scores) / len(scores) for key in scores[0]})
    return report


def report_table(report: Mapping, title: str) -> Table:
    """The report as a rich table: counts with %, token avg/max, then pass@k and maj@K."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("", justify="right")
    for flag, label in FLAGS:
        table.add_row(label, f"{report[flag]}/{report['samples']}", f"{report[f'{flag}_pct']:.1f}%")
    for side, label in (("input", "Input tokens"), ("output", "Output tokens")):
        table.add_row(label, f"avg {report[f'{side}_tokens_avg']:.1f}", f"max {report[f'{side}_tokens_max']}")
    for key in report:
        if key.startswith(("pass@", "maj@")):
            table.add_row(key, f"{report[key]:.3f}", "")
    return table


# --- loading and the batched sampling loop ----------------------------------------------------


def load_eval(model: ModelConfig, task: TaskConfig, split: str, device: str = "cpu"):
    """(engine, task, problems) for an evaluation: the task named in ``task``, the first
    ``task.test_size`` problems of ``split`` (0: all), the policy at ``model.path`` (a posttrain
    checkpoint dir, an HF model dir or hub id, a .gguf file) in eval mode behind an Engine with the
    calculator. Bad inputs raise ValueError / OSError / ImportError with a message that names them."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'{suggest(split, list(SPLITS))}")
    built = make_task(task)
    built.check("eval")
    rows = getattr(built, split, None)
    if rows is None:
        raise ValueError(f"task '{task.name}' has no fixed '{split}' split to evaluate")
    problems = rows[: task.test_size] if task.test_size else rows
    if not problems:
        raise ValueError(f"task '{task.name}' has no '{split}' problems to evaluate")
    if model.path is None or not (Path(model.path).exists() or _HUB_ID.fullmatch(model.path)):
        raise FileNotFoundError(f"model path '{model.path}' does not exist")
    policy, tokenizer = load_policy(model, LoraConfig(), resolve_device(device))
    return Engine(policy.eval(), tokenizer, default_registry()), built, problems


def run_eval(engine: Engine, task, problems: Sequence, samples: int, params: SamplingParams, batch: int,
             seed: int, out: str | Path, progress: bool = True, world: World | None = None) -> dict[str, float]:
    """Sample ``samples`` completions per problem, ``batch`` problems per engine call (a problem's
    samples share its prefilled prompt), grade them with ``task.grade`` (completions decoded without
    their stop token; a grade that raises counts the sample wrong, ``grade_failures`` in the report), write
    one problem_record per line to ``out`` (overwritten, flushed per line)
    and return ``summarize`` of the records. Problem p samples its group from ``group_seed(seed, p)``, so
    the same seed gives the same samples whatever ``batch``.

    Data parallel (``world``): each rank samples problems rank, rank + N, ...; the records are gathered in
    problem order, rank 0 writes ``out`` (once, at the end) and every rank returns the one-process report."""
    world = world or World()
    out = Path(out)
    if world.main:
        out.parent.mkdir(parents=True, exist_ok=True)
    mine = world.shard(list(range(len(problems))))
    failures = SampleFailures(f"the {task.name} task's grade")
    records, error = [], None
    try:
        records = _sample(engine, task, problems, mine, samples, params, batch, seed, out if world.size == 1 else None,
                          failures, progress and world.main)
    except Exception as err:  # noqa: BLE001 - raised on every rank just below (the others would wait for it)
        error = err
    world.raise_any(error)
    ordered = [record for _, record in sorted(world.gather(records), key=lambda pair: pair[0])]
    if world.size > 1 and world.main:
        with out.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in ordered)
    firsts = world.gather([failures.first])
    failures.count, failures.first = int(world.sum([failures.count])[0]), next((x for x in firsts if x), None)
    if world.main:
        failures.report(len(ordered) * samples)
    return summarize(ordered) | {"grade_failures": failures.count}


def _sample(engine: Engine, task, problems: Sequence, mine: list[int], samples: int, params: SamplingParams,
            batch: int, seed: int, out: Path | None, failures: SampleFailures,
            progress: bool) -> list[tuple[int, dict]]:
    """(problem index, problem_record) of problems ``mine``, in order; each record also written to ``out`` as it
    comes (flushed per line) when given."""
    tok = engine.tokenizer
    records: list[tuple[int, dict]] = []
    exact = 0
    bar = StepProgress(f"eval {task.name}", len(mine), ("exact",), enabled=progress)
    with (out.open("w", encoding="utf-8") if out is not None else nullcontext()) as f, bar:
        for start in range(0, len(mine), batch):
            index = mine[start : start + batch]
            convs = [task.prompt(problems[p]) for p in index]
            prompts = [tok.render_for_completion(c) for c in convs]
            rollout = engine.generate(prompts, samples, params, seeds=[group_seed(seed, p) for p in index])
            for i, (p, conv) in enumerate(zip(index, convs, strict=True)):
                rows = range(i * samples, (i + 1) * samples)  # problem i's samples, in row order
                texts = [completion_text(tok, rollout, j) for j in rows]
                grades = [failures.call(task.grade, conv, t, fallback=FAILED_GRADE) for t in texts]
                graded = next((g for g in grades if g is not FAILED_GRADE), {})  # a grade that did not fail
                gold = graded.get("gold", conv["answer"])  # the dataset task's gold as its answers are read
                record = problem_record(problems[p].question, gold, len(prompts[i]), texts,
                                        [int(rollout.lengths[j]) for j in rows], grades)
                if f is not None:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    f.flush()
                records.append((p, record))
                exact += sum(record["exact"])
                bar.update({"exact": exact / (len(records) * samples)})
    return records
