"""``TaskConfig``, the ``task:`` section of every stage: which task supplies prompts, solutions and the
verifiable reward. A leaf module (only the config checks imported), re-exported by ``posttrain.config``.

Most fields belong to one task; one set to a non-default value under another task is a config error
(``task.data`` under the generated arithmetic task would otherwise be silently ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from posttrain.config_checks import ConfigError, check_choice, check_range

TASK_NAMES = ("arithmetic", "gsm8k", "dataset", "short_answer")
GSM8K_DATA = "openai/gsm8k"  # gsm8k's data when task.data is not set
DATASET_REWARDS = ("exact_match", "numeric_match", "multiple_choice", "regex_format")
SHORT_ANSWER_SKILLS = ("add", "add2", "multiply", "subtract", "compare", "letters", "convert", "word")  # + "mixed"

# The fields each task reads (the others must keep their defaults under it).
_OWN_FIELDS = {
    "arithmetic": {"teacher_error", "test_size", "test_seed", "format"},
    "gsm8k": {"test_size", "data", "format", "extract", "math_verify"},
    "dataset": {"test_size", "test_seed", "data", "split", "test_split", "prompt", "system", "answer", "reward",
                "format_regex"},
    "short_answer": {"test_size", "test_seed", "skill"},
}


@dataclass
class TaskConfig:
    """Which task supplies problems and rewards."""

    name: str = "arithmetic"  # task name: arithmetic (built-in, generated) | gsm8k | dataset (your own prompts) |
    # short_answer (generated one-step questions, for small pretrained chat models); or a
    # task class of your own: pkg.mod:MyTask or path/to/file.py:MyTask (README: the Task interface)
    skill: str | None = None  # short_answer: add | add2 | multiply | subtract | compare | letters | convert | word |
    # mixed (all), or a comma-separated list "add,subtract" (None: mixed)
    teacher_error: float = 0.3  # arithmetic: share of SFT solutions with one wrong step (imperfect teacher)
    test_size: int = 256  # held-out problems (gsm8k: the first N rows; dataset: N rows drawn with test_seed
    # unless test_split is set, then its first N; 0: all of the test split; arithmetic and short_answer: >= 1)
    test_seed: int = 1234  # arithmetic and short_answer: seed of the generated test split; dataset: which rows are
    # held out
    data: str | None = None  # gsm8k (default openai/gsm8k) and dataset: a .jsonl/.json/.csv/.parquet file, a dir of
    # such split files (train.jsonl, test.jsonl, ...) or a datasets save_to_disk dir, or a Hugging Face hub id
    split: str = "train"  # dataset: the split to train on (a dir's or hub dataset's split name)
    test_split: str | None = None  # dataset: the held-out split (a split name or a file); None: test_size rows of
    # the training data are held out
    prompt: str = "prompt"  # dataset: the prompt column (a string or a list of chat messages), or a template
    # naming columns in braces: "Question: {question}"
    system: str | None = None  # dataset: a system message put before every prompt that has none
    answer: str | None = None  # dataset: the gold-answer column, dotted for nested fields (reward_model.ground_truth);
    # None: 'answer', else verl's reward_model.ground_truth, when the data has it
    reward: str = "exact_match"  # dataset: the verifiable reward that 'task' names in `rewards` and that evaluation
    # counts: exact_match | numeric_match | multiple_choice | regex_format
    format_regex: str | None = None  # dataset: the pattern regex_format checks a whole completion against
    format: str | None = None  # prompt/answer format: hash ('#### N') | xml (<reasoning>/<answer>, gsm8k) | tool
    # (calculator calls); None: the task's own (arithmetic: tool, gsm8k: hash)
    extract: str | None = None  # gsm8k answer extraction: strict | flexible | xml (None: the format's own)
    math_verify: bool = False  # gsm8k: also accept answers math-verify finds equivalent (needs posttrain[hf])

    def __post_init__(self):
        if ":" in self.name:  # a task of your own reads what it likes (make_task loads it)
            return
        check_choice("task.name", self.name, list(TASK_NAMES))
        self._check_own_fields()
        check_range("task.teacher_error", self.teacher_error, 0, 1)
        generated = self.name in ("arithmetic", "short_answer")  # a generated test split: 0 rows is not 'all' there
        check_range("task.test_size", self.test_size, int(generated),
                    note=f" for the {self.name} task (0 means 'all' only for gsm8k and dataset)" if generated else "")
        if self.name == "short_answer" and self.skill is not None:
            names = [name.strip() for name in self.skill.split(",")]
            for name in names:
                check_choice("task.skill", name, [*SHORT_ANSWER_SKILLS, "mixed"])
            if "mixed" in names and len(names) > 1:
                raise ConfigError("config key 'task.skill': 'mixed' already means every skill; give it alone or list "
                                  "the skills")
        if self.name == "dataset":
            if not self.data:
                raise ConfigError("the dataset task needs task.data: a .jsonl/.json/.csv/.parquet file, a directory "
                                  "of split files or a datasets save_to_disk directory, or a hub dataset id")
            check_choice("task.reward", self.reward, list(DATASET_REWARDS))
            if self.reward == "regex_format" and not self.format_regex:
                raise ConfigError("task.reward 'regex_format' needs task.format_regex, the pattern a completion "
                                  "must match")
            if not self.prompt.strip():
                raise ConfigError("config key 'task.prompt' is empty: name the prompt column or give a template")

    def _check_own_fields(self) -> None:
        """ConfigError for a field another task reads, set to a non-default value under this one."""
        own = _OWN_FIELDS[self.name] | {"name"}
        for f in fields(self):
            if f.name not in own and getattr(self, f.name) != f.default:
                users = [name for name, keys in _OWN_FIELDS.items() if f.name in keys]
                raise ConfigError(f"config key 'task.{f.name}' does not apply to the {self.name} task (it is read by "
                                  f"the {' and '.join(users)} task{'s' if len(users) > 1 else ''}): remove it, or set "
                                  f"task.name={users[0]}")
