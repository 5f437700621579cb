"""Dataset rows from local files and the Hugging Face hub, each with where it came from.

Every reader yields ``(where, row)`` pairs, ``where`` naming the row for error messages:

- JSON lines: ``'path:LINE'`` (1-based line; blank lines are skipped);
- parquet: ``'path row I'`` (0-based row);
- hub: ``'dataset[split] row I'`` (0-based row).

A task turns each row into its own record (``gsm8k.to_problem``, ``preference.to_pair``). ``what``
(the task's name) starts the messages about a file or dataset as a whole: ``"gsm8k data file x.csv
must be .jsonl or .parquet"``. Readers are generators, so a task's row error is raised in file order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

SUFFIXES = (".jsonl", ".parquet")
Row = tuple[str, object]  # (where, row)


def jsonl_rows(path: Path) -> Iterator[Row]:
    """Rows of a JSON-lines file (blank lines skipped); errors name the file and the 1-based line."""
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported with its number
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
            yield f"{path}:{number}", row


def parquet_rows(path: Path) -> Iterator[Row]:
    """Rows of a parquet file, read with pyarrow (or pandas); ``where`` names the file and the 0-based row."""
    try:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    except ImportError:
        try:
            import pandas
        except ImportError:
            raise ImportError(
                f"reading {path} needs pyarrow: pip install 'posttrain[hf]' (or pip install pyarrow)"
            ) from None
        rows = pandas.read_parquet(path).to_dict("records")
    for i, row in enumerate(rows):
        yield f"{path} row {i}", row


def file_rows(path: Path, what: str) -> Iterator[Row]:
    """Rows of a .jsonl or .parquet file; ValueError for another suffix, or once read if it has no rows."""
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{what} data file {path} must be .jsonl or .parquet")
    rows = jsonl_rows(path) if path.suffix == ".jsonl" else parquet_rows(path)
    yield from _nonempty(rows, f"{what} data file {path} has no rows")


def split_file(directory: Path, split: str, what: str) -> Path:
    """``directory/split.jsonl``, else ``directory/split.parquet``; FileNotFoundError if neither exists."""
    for suffix in SUFFIXES:
        if (directory / f"{split}{suffix}").is_file():
            return directory / f"{split}{suffix}"
    raise FileNotFoundError(f"{what} data directory {directory} has no {split}.jsonl or {split}.parquet")


def load_hub(dataset_id: str, config: str | None, what: str) -> Mapping:
    """``datasets.load_dataset(dataset_id, config)``: its splits by name. FileNotFoundError naming
    ``pip install 'posttrain[hf]'`` when ``datasets`` is missing (the id was then most likely a path)."""
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(
            f"{what} data '{dataset_id}' is not a local file or directory; to load it as a Hugging Face hub "
            "dataset: pip install 'posttrain[hf]'"
        ) from None
    return datasets.load_dataset(dataset_id, config)


def hub_rows(loaded: Mapping, dataset_id: str, split: str, what: str) -> Iterator[Row]:
    """Rows of split ``split`` of a loaded hub dataset; ValueError if it has no such split, or once read
    if the split has no rows."""
    if split not in loaded:
        raise ValueError(f"{what} dataset '{dataset_id}' has no split '{split}' (it has: {', '.join(loaded)})")
    rows = ((f"{dataset_id}[{split}] row {i}", row) for i, row in enumerate(loaded[split]))
    yield from _nonempty(rows, f"{what} dataset '{dataset_id}' split '{split}' has no rows")


def _nonempty(rows: Iterable[Row], message: str) -> Iterator[Row]:
    """``rows`` passed through; ValueError(message) at the end if there were none."""
    empty = True
    for item in rows:
        empty = False
        yield item
    if empty:
        raise ValueError(message)
