"""Typed configs of the preference trainers: the reward model (``posttrain rm``) and DPO (``posttrain dpo``).

They share the run options (resume, checkpoints, sinks, health monitor) and the section types of
:mod:`posttrain.config`, and load the same way (YAML + dotted overrides).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.config import (
    EvalConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RunOptions,
    TaskConfig,
    check_choice,
    check_range,
    check_run,
)


@dataclass
class PreferenceDataConfig:
    """Which preference pairs to learn from (see ``posttrain.tasks.preference`` for the row shapes)."""

    source: str = "arithmetic"  # arithmetic (pairs generated from the built-in task) | a dir with train/test
    # .jsonl|.parquet files | one such file | an HF dataset id
    train_size: int = 4096  # arithmetic: generated training pairs
    test_size: int = 256  # held-out pairs: one file's first N rows (0: none held out); a dir's or dataset's first
    # N test rows (0: all of them); arithmetic: pairs on the task's first N held-out problems
    ramble_share: float = 0.5  # arithmetic: share of rejected replies that are right but ramble (the rest: one slip)
    format: str = "tool"  # arithmetic: reply format, tool (built-in GPT) | hash (plain text, for HF chat models)
    max_length: int = 0  # pairs longer than this many tokens (prompt + reply) are skipped and counted (0: the
    # model's context length when it has one)
    seed: int = 0  # arithmetic: seed of the generated training pairs

    def __post_init__(self):
        check_range("data.train_size", self.train_size, 1)
        check_range("data.test_size", self.test_size, 0)
        check_range("data.ramble_share", self.ramble_share, 0, 1)
        check_choice("data.format", self.format, ["tool", "hash"])
        check_range("data.max_length", self.max_length, 0, note=" (0: the model's context length)")


@dataclass
class RMConfig(RunOptions):
    """Reward-model training: a scalar head on the policy's trunk, Bradley–Terry loss on preference pairs."""

    run_dir: str = "runs/rm"  # where metrics and checkpoints go (checkpoints/final is the reward model)
    seed: int = 0  # seeds data order
    threads: int = 0  # torch CPU threads (0: torch's default); under torchrun shared by the node's processes
    model: ModelConfig = field(default_factory=lambda: ModelConfig("runs/sft/checkpoints/final"))  # trunk to start from
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters on the trunk (HF models)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)  # the pairs
    steps: int = 200  # optimizer steps
    batch_size: int = 32  # pairs per step
    micro_batch: int = 32  # pairs per forward/backward chunk
    use_margin: bool = True  # subtract the data's per-pair margin inside the sigmoid (Llama 2)
    center_coef: float = 0.0  # weight of the reward-centering term mean((r_c + r_r)²)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10))  # optimizer
    eval_every: int = 50  # held-out pair accuracy every N steps (0: only at the end)

    def __post_init__(self):
        check_run(self)
        for key in ("batch_size", "micro_batch"):
            check_range(key, getattr(self, key), 1)
        check_range("center_coef", self.center_coef, 0)
        check_range("eval_every", self.eval_every, 0, note=" (0: only at the end)")


@dataclass
class DPOConfig(RunOptions):
    """Direct preference optimisation of the policy on preference pairs, against a frozen reference."""

    run_dir: str = "runs/dpo"  # where metrics and checkpoints go
    seed: int = 0  # seeds data order
    threads: int = 0  # torch CPU threads (0: torch's default); under torchrun shared by the node's processes
    model: ModelConfig = field(default_factory=lambda: ModelConfig("runs/sft/checkpoints/final"))  # policy to train
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters (HF); the reference is then the adapter off
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)  # the pairs
    steps: int = 200  # optimizer steps
    batch_size: int = 32  # pairs per step
    micro_batch: int = 32  # pairs per forward/backward chunk
    loss: str = "sigmoid"  # sigmoid (DPO; with label_smoothing: conservative DPO) | ipo | hinge | robust
    beta: float = 0.1  # β: strength of the implicit KL to the reference
    label_smoothing: float = 0.0  # ε: assumed share of flipped labels (sigmoid, robust)
    rpo_alpha: float = 0.0  # weight of the chosen reply's mean token NLL added to the loss (RPO, Pang 2024; 0: off)
    precompute_ref: bool = False  # score every pair under the starting policy once, before training (no reference copy)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10))  # optimizer
    task: TaskConfig | None = None  # a task whose held-out problems also measure the policy (pass@k); None: none
    eval: EvalConfig = field(default_factory=EvalConfig)  # cadence (every) of both evaluations; sampling for the task's

    def __post_init__(self):
        from posttrain.algorithms.losses import DPO_LOSSES

        check_run(self)
        check_choice("loss", self.loss, list(DPO_LOSSES))
        for key in ("batch_size", "micro_batch"):
            check_range(key, getattr(self, key), 1)
        check_range("beta", self.beta, 0, low_open=True)
        check_range("label_smoothing", self.label_smoothing, 0, 0.5, high_open=True)
        check_range("rpo_alpha", self.rpo_alpha, 0)
