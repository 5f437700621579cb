"""Dataset rows from local files and the Hugging Face hub, each with where it came from.

Every reader yields ``(where, row)`` pairs, ``where`` naming the row for error messages:

- JSON lines: ``'path:LINE'`` (1-based line; blank lines are skipped);
- JSON (a list of objects): ``'path row I'`` (0-based row);
- CSV (a header line, then one row per record): ``'path:LINE'`` (1-based line of the file);
- parquet: ``'path row I'`` (0-based row);
- hub and ``datasets`` ``save_to_disk`` directories: ``'dataset[split] row I'`` (0-based row).

A task turns each row into its own record (``gsm8k.to_problem``, ``preference.to_pair``). ``what``
(the task's name) starts the messages about a file or dataset as a whole: ``"gsm8k data file x.csv
must be .jsonl or .parquet"``. Readers are generators, so a task's row error is raised in file order.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
Row = tuple[str, object]  # (where, row)


class DataError(ValueError):
    """A data file or dataset that cannot be used, with a message naming the file (and line) and what is wrong;
    the CLI prints it as one line and exits 2."""


def jsonl_rows(path: Path) -> Iterator[Row]:
    """Rows of a JSON-lines file (blank lines skipped); errors name the file and the 1-based line."""
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported with its number
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
            yield f"{path}:{number}", row


def json_rows(path: Path) -> Iterator[Row]:
    """Rows of a JSON file holding a list of objects (a file of JSON lines named .json is read as JSON lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line: JSON lines under a .json name
            yield from jsonl_rows(path)
            return
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows (objects), got a {type(rows).__name__}")
    for i, row in enumerate(rows):
        yield f"{path} row {i}", row


def csv_rows(path: Path) -> Iterator[Row]:
    """Rows of a CSV file with a header line, as {column: text}; ``where`` is the 1-based line the row ends on.
    A row with more fields than the header is an error."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                if None in row:
                    raise DataError(f"{path}:{reader.line_num}: {len(reader.fieldnames) + len(row[None])} fields, "
                                    f"the header has {len(reader.fieldnames)}")
                yield f"{path}:{reader.line_num}", row
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None


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


READERS = {".jsonl": jsonl_rows, ".json": json_rows, ".csv": csv_rows, ".parquet": parquet_rows}


def _listed(names: list[str]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1]


def file_rows(path: Path, what: str) -> Iterator[Row]:
    """Rows of a .jsonl, .json, .csv or .parquet file; DataError for another suffix, or once read if it has
    no rows."""
    if path.suffix not in READERS:
        raise DataError(f"{what} data file {path} must be {_listed(list(SUFFIXES))}")
    yield from _nonempty(READERS[path.suffix](path), f"{what} data file {path} has no rows")


def split_file(directory: Path, split: str, what: str) -> Path:
    """The first of ``directory/split`` + each of SUFFIXES that exists; FileNotFoundError if none does."""
    for suffix in SUFFIXES:
        if (directory / f"{split}{suffix}").is_file():
            return directory / f"{split}{suffix}"
    raise FileNotFoundError(f"{what} data directory {directory} has no "
                            f"{_listed([split + suffix for suffix in SUFFIXES])}")


def saved_dataset(directory: Path) -> Mapping | None:
    """The splits of a ``datasets`` ``save_to_disk`` directory (a DatasetDict, or one Dataset as split
    'train'), or None when ``directory`` is not one."""
    if not ((directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file()):
        return None
    try:
        import datasets
    except ImportError:
        raise DataError(f"{directory} is a datasets save_to_disk directory: pip install 'posttrain[hf]' to read it") \
            from None
    loaded = datasets.load_from_disk(str(directory))
    return loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


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
        raise DataError(f"{what} dataset '{dataset_id}' has no split '{split}' (it has: {', '.join(loaded)})")
    rows = ((f"{dataset_id}[{split}] row {i}", row) for i, row in enumerate(loaded[split]))
    yield from _nonempty(rows, f"{what} dataset '{dataset_id}' split '{split}' has no rows")


def _nonempty(rows: Iterable[Row], message: str) -> Iterator[Row]:
    """``rows`` passed through; ValueError(message) at the end if there were none."""
    empty = True
    for item in rows:
        empty = False
        yield item
    if empty:
        raise DataError(message)
