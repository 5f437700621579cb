"""Typed run configs: dataclasses with a one-line doc per field, each checking its values.

Reading them from YAML files and ``key=value`` overrides is :mod:`posttrain.config_files` (its
``load_config`` is importable from here too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from posttrain.algorithms.presets import RL_FALLBACK, RL_PRESETS
from posttrain.config_checks import ConfigError, check_choice, check_range, suggest
from posttrain.config_files import build_config, expand_dotted, load_config, save_config, to_dict  # noqa: F401
from posttrain.distributed import DistributedConfig
from posttrain.engine import SamplingParams
from posttrain.evaluation import EvalConfig
from posttrain.metrics import SINKS
from posttrain.models.gpt import GPTConfig
from posttrain.monitor import MonitorConfig
from posttrain.prompt_sampling import PromptSamplingConfig
from posttrain.rollout.base import RolloutConfig
from posttrain.task_config import GSM8K_DATA, TaskConfig

T = TypeVar("T")
GROUP_BASELINES = ("grpo", "dr_grpo", "rloo", "reinforce")  # advantages measured against the prompt's group


@dataclass
class ModelConfig:
    """Which policy to load. ``model=PATH`` on the command line (or ``model: PATH`` in YAML) sets ``path``."""

    path: str | None = None  # a posttrain checkpoint dir, an HF model dir or hub id, or a .gguf file (None: fresh GPT)
    dtype: str = "float32"  # HF models: float32 | bfloat16 | float16
    tool_tokens: bool = False  # HF models: add the calculator's 4 special tokens (the embedding grows)
    chat_template: str | None = None  # HF models: a Jinja chat template (text, or a file) replacing the tokenizer's

    def __post_init__(self):
        check_choice("model.dtype", self.dtype, ["float32", "bfloat16", "float16"])


@dataclass
class LoraConfig:
    """LoRA adapters through peft (HF models only); the reference policy is the model with the adapter off."""

    rank: int = 0  # adapter rank r (0: train every weight)
    alpha: float = 32.0  # scale alpha / r of the adapter's update
    dropout: float = 0.0  # dropout on the adapter's input
    target_modules: tuple[str, ...] = ()  # module names to adapt, e.g. [q_proj, v_proj] (empty: all linear layers)

    def __post_init__(self):
        check_range("lora.rank", self.rank, 0)
        if self.rank > 0:  # without an adapter alpha means nothing
            check_range("lora.alpha", self.alpha, 0, low_open=True)
        check_range("lora.dropout", self.dropout, 0, 1, high_open=True)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay (matrices only)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    warmup_steps: int = 20  # linear warm-up from 0 to lr
    schedule: str = "cosine"  # after warm-up: cosine | linear | constant
    min_lr_ratio: float = 0.0  # final lr as a fraction of lr
    grad_clip: float = 1.0  # clip the global grad norm to this (0: off)

    def __post_init__(self):
        check_choice("optim.schedule", self.schedule, ["cosine", "linear", "constant"])
        check_range("optim.lr", self.lr, 0, low_open=True)
        check_range("optim.weight_decay", self.weight_decay, 0)
        for beta in self.betas:
            check_range("optim.betas", beta, 0, 1, high_open=True)
        check_range("optim.warmup_steps", self.warmup_steps, 0)
        check_range("optim.min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_range("optim.grad_clip", self.grad_clip, 0, note=" (0: off)")


@dataclass
class LogConfig:
    """Where metrics go besides the console and ``metrics.jsonl`` (always on)."""

    report_to: tuple[str, ...] = ()  # extra sinks: tensorboard (needs tensorboard) | wandb (needs wandb, logged in)
    project: str = "posttrain"  # W&B project
    run_name: str | None = None  # W&B run / TensorBoard label (None: the run directory's name)
    every: int = 10  # without a live progress bar (no terminal, or --no-progress): a plain text line of the key
    # metrics every N steps and at the last (0: none)

    def __post_init__(self):
        for name in self.report_to:
            check_choice("log.report_to", name, list(SINKS))
        check_range("log.every", self.every, 0, note=" (0: no plain lines)")


@dataclass
class RunOptions:
    """What every trainer's run has: resuming, checkpoints, metric sinks, the health monitor."""

    resume: str = "auto"  # auto: continue from run_dir's latest checkpoint, if any (refused when a key that shapes
    # training changed) | force: the same, with the changed values | never: start fresh | a ckpt dir
    save_every: int = 50  # write a resumable checkpoint every N steps (0: only the final one)
    keep_last: int = 3  # step checkpoints kept (older ones are deleted; the final one always stays)
    log: LogConfig = field(default_factory=LogConfig)  # metric sinks
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # health checks and their actions
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # under torchrun: how ranks split work
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (cpu: fp32, cuda: bf16-mixed) | fp32 | bf16-mixed | fp16-mixed | bf16-true
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory, more time)
    epochs: float = 0.0  # passes over the training data; > 0 sets steps to ⌈epochs · rows / rows per step⌉ (fixed data)


SFT_LOSSES = ("full", "completion", "answer_only")  # SFTConfig.loss: which tokens are trained on


@dataclass
class SFTConfig(RunOptions):
    """Supervised fine-tuning on task solutions (teacher forcing on assistant tokens)."""

    run_dir: str = "runs/sft"  # where metrics, samples and checkpoints go
    seed: int = 0  # seeds data order and initialisation
    threads: int = 0  # torch CPU threads (0: torch's default); under torchrun shared by the node's processes
    model: ModelConfig = field(default_factory=ModelConfig)  # the policy to start from (path None: a fresh GPT)
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters (HF models)
    steps: int = 600  # optimizer steps
    batch_size: int = 64  # conversations per step
    gpt: GPTConfig = field(default_factory=GPTConfig)  # built-in GPT sizes (fresh model only)
    task: TaskConfig = field(default_factory=TaskConfig)  # problems and rewards
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and schedule
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out evaluation
    loss: str = "completion"  # tokens the loss covers: full (the whole rendered sequence, prompt included) |
    # completion (the assistant turn: reasoning + answer) | answer_only (the final-answer span)
    packing: bool = False  # pack several examples per row, attention and positions kept apart per example
    max_length: int = 0  # longest rendered example in tokens (0: the model's context length)
    overlong: str = "truncate"  # an example over max_length: truncate (cut to it) | skip (left out); both counted

    def __post_init__(self):
        check_run(self)
        check_range("batch_size", self.batch_size, 1)
        check_choice("loss", self.loss, list(SFT_LOSSES))
        check_range("max_length", self.max_length, 0, note=" (0: the model's context length)")
        check_choice("overlong", self.overlong, ["truncate", "skip"])


@dataclass
class CriticConfig:
    """The PPO critic: a value head on a trainable copy of the policy trunk (advantage: gae only)."""

    lr: float = 2e-3  # critic peak learning rate (same warm-up and schedule as the policy)
    warmup_steps: int = 5  # first RL steps train only the critic (the policy waits for sane values)
    value_clip: float = 0.2  # clip V to V_old ± this in the value loss (0: no clipping)

    def __post_init__(self):
        check_range("critic.lr", self.lr, 0, low_open=True)
        check_range("critic.warmup_steps", self.warmup_steps, 0)
        check_range("critic.value_clip", self.value_clip, 0, note=" (0: no clipping)")


@dataclass
class RewardModelConfig:
    """A learned reward model as an RL reward source, named ``reward_model`` in ``rewards``."""

    path: str | None = None  # a reward model: `posttrain rm`'s checkpoints/final, or an HF *ForSequenceClassification
    # directory with one label (TRL's RewardTrainer output); None: none
    clamp: tuple[float, float] = (-10.0, 10.0)  # scores are clipped to [low, high] before they are used
    batch_size: int = 64  # completions per reward-model forward (no gradients)

    def __post_init__(self):
        low, high = self.clamp
        if not low < high:
            raise ConfigError(f"config key 'reward_model.clamp' must be [low, high] with low < high, "
                              f"got {list(self.clamp)}")
        check_range("reward_model.batch_size", self.batch_size, 1)


@dataclass
class RLConfig(RunOptions):
    """On-policy RL from a checkpoint with the task's verifiable reward. ``algorithm`` names a preset
    (RL_PRESETS) that fills every field left at None; set a field to override its preset."""

    run_dir: str = "runs/rl"  # where metrics, samples and checkpoints go
    seed: int = 0  # seeds prompt order and sampling
    threads: int = 0  # torch CPU threads (0: torch's default); under torchrun shared by the node's processes
    model: ModelConfig = field(default_factory=lambda: ModelConfig("runs/sft/checkpoints/final"))  # policy to train
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters (HF models)
    algorithm: str = "grpo"  # preset: nanochat | grpo | dr_grpo | dapo | rloo | reinforce_pp | ppo
    steps: int = 100  # RL steps (one rollout batch each)
    prompts_per_step: int = 16  # distinct prompts per step
    samples_per_prompt: int = 8  # completions per prompt (the group size G)
    advantage: str | None = None  # estimator: grpo | dr_grpo | rloo | reinforce | reinforce_pp | gae
    adv_scale: str | None = None  # grpo estimator: divide r − mean by the group std, batch std, or none
    gamma: float = 1.0  # discount of the token-level estimators (reinforce_pp, gae)
    lam: float = 0.95  # GAE λ
    loss_agg: str | None = None  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    clip_low: float | None = None  # PPO ratio clip below 1 (.inf: none)
    clip_high: float | None = None  # PPO ratio clip above 1 (DAPO clip-higher when > clip_low; .inf: none)
    dual_clip: float = 0.0  # dual-clip bound c > 1 on the loss of negative-advantage tokens (0: off)
    ratio_level: str = "token"  # importance ratio per token, or per sequence (GSPO)
    ppo_epochs: int | None = None  # passes over each rollout batch
    minibatches: int | None = None  # optimizer steps per pass, each on 1/minibatches of the rows
    kl_coef: float | None = None  # β of the KL to the initial policy (0: no reference model at all)
    kl_kind: str | None = None  # KL estimator: k1 | k2 | k3
    kl_in: str | None = None  # loss: + β·KL in the loss (GRPO); reward: −β·KL per token in the reward (PPO)
    kl_controller: str = "fixed"  # fixed | adaptive (β follows kl_target, Ziegler et al. 2019)
    kl_target: float = 6.0  # adaptive controller: target KL per sequence (nats)
    kl_horizon: int = 10000  # adaptive controller: samples over which β moves
    entropy_coef: float | None = None  # entropy bonus weight in the policy loss
    dynamic_sampling: bool | None = None  # DAPO: drop zero-variance groups and draw more prompts
    max_sampling_rounds: int = 4  # dynamic sampling: rollout rounds per step at most
    overlong: str | None = None  # truncated completions: none | mask (no loss) | penalty (DAPO soft penalty)
    overlong_buffer: int = 16  # soft penalty ramps over the last this-many tokens of the budget
    overlong_factor: float = 1.0  # soft penalty at the budget
    max_tokens_per_micro_batch: int = 4096  # real tokens per forward of the scoring passes and update (packed rows)
    mismatch_every: int = 10  # compare behaviour and trainer log-probs over all rows every N steps (0: never)
    is_correction: str = "none"  # sampler/trainer mismatch: none | tis (policy-gradient term × min(π_old/π_behaviour,
    # is_clip)) | icepop (tokens whose π_old/π_behaviour is outside [1/is_clip, is_clip] get none); scores π_old always
    is_clip: float = 2.0  # C of is_correction
    off_policy: str = "decoupled"  # rows made by older weights (rollout.max_staleness): decoupled (π_old recomputed,
    # ratio against it, tokens weighed by is_correction) | bypass (the behaviour log-probs are π_old: no recompute)
    critic: CriticConfig = field(default_factory=CriticConfig)  # PPO critic (advantage: gae)
    sampling: SamplingParams = field(default_factory=SamplingParams)  # rollout sampling
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # where rollouts are generated: local | ray
    prompt_sampling: PromptSamplingConfig = field(default_factory=PromptSamplingConfig)  # which prompts: uniform |
    # curriculum | priority, over a pool of training problems
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, schedule="linear"))
    task: TaskConfig = field(default_factory=TaskConfig)  # problems and rewards
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out evaluation
    rewards: dict[str, float] = field(default_factory=dict)  # reward fn → weight: a built-in name, 'task' (the
    # task's 0/1 reward), 'reward_model', 'package.module:function' or 'path/to/file.py:function' (called as TRL
    # calls it); empty: {task: 1.0}, or {reward_model: 1.0} when reward_model.path is set
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)  # a learned reward model
    reward_timeout: float = 30.0  # seconds a reward function may run per batch before its samples get the fallback
    reward_workers: int = 2  # worker processes for rewards loadable by name (built-ins, module or file paths): a
    # call past reward_timeout is killed there; 0: every reward runs in the trainer's process (timeout best effort)
    reward_fallback: float = 0.0  # reward of samples whose function raised, hung or returned NaN
    reward_on_error: str = "fallback"  # a reward function fails: fallback (and go on) | raise (stop the run)
    reward_max_failure_rate: float = 0.5  # fallback: stop the run when one function fails on more of a batch
    max_prompt_length: int = 0  # rendered prompt tokens allowed (0: no limit); longer ones per long_prompts
    long_prompts: str = "truncate"  # truncate (keep the last max_prompt_length tokens, as TRL) | skip (draw another)
    log_samples_every: int = 10  # write prompts/completions/rewards to samples.jsonl every N steps
    eval_before: bool = True  # evaluate the initial policy before the first step

    def __post_init__(self):
        from posttrain.algorithms import advantages, losses

        check_choice("algorithm", self.algorithm, list(RL_PRESETS))
        for key, value in {**RL_FALLBACK, **RL_PRESETS[self.algorithm]}.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for key, valid in (
            ("advantage", [*advantages.ADVANTAGES, "reinforce_pp", "gae"]),
            ("adv_scale", advantages.GRPO_SCALES),
            ("loss_agg", losses.AGGREGATIONS),
            ("kl_kind", losses.KL_ESTIMATORS),
            ("kl_in", ["loss", "reward"]),
            ("kl_controller", losses.KL_CONTROLLERS),
            ("ratio_level", losses.RATIO_LEVELS),
            ("is_correction", losses.IS_CORRECTIONS),
            ("overlong", ["none", "mask", "penalty"]),
            ("off_policy", ["decoupled", "bypass"]),
            ("reward_on_error", ["fallback", "raise"]),
        ):
            check_choice(key, getattr(self, key), list(valid))
        for key in ("ppo_epochs", "minibatches", "max_sampling_rounds", "max_tokens_per_micro_batch",
                    "overlong_buffer"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}' must be >= 1, got {getattr(self, key)}")
        from posttrain.rewards import REWARDS

        if not self.rewards and self.reward_model.path:
            self.rewards = {"reward_model": 1.0}
        for name in self.rewards:
            if name not in ("task", "reward_model") and name not in REWARDS and ":" not in name:
                raise ConfigError(f"config key 'rewards' has unknown reward '{name}'"
                                  f"{suggest(name, ['task', 'reward_model', *REWARDS])}"
                                  "; a function of your own is 'package.module:function' or 'path/to/file.py:function'")
        if self.reward_model.path and "reward_model" not in self.rewards:
            raise ConfigError(f"config key 'reward_model.path' is set but 'rewards' ({dict(self.rewards)}) does not "
                              "use it: add reward_model: <weight> to rewards, or unset reward_model.path")
        if "reward_model" in self.rewards and not self.reward_model.path:
            raise ConfigError("config key 'rewards' names 'reward_model' but 'reward_model.path' is not set "
                              "(reward_model.path=runs/rm/checkpoints/final)")
        self._check_off_policy()
        self.rollout.check_keys(tuple(dict.fromkeys((self.rollout.backend, self.eval.backend or self.rollout.backend))))
        if self.kl_in == "loss" and self.kl_kind == "k1" and self.kl_coef > 0:
            raise ConfigError("config key 'kl_kind' k1 in the loss (kl_in=loss) has an expected gradient of exactly "
                              "0: use k2 (the gradient of KL(π‖π_ref)) or k3 (of KL(π_ref‖π)), or kl_in=reward")
        if self.is_correction != "none" and self.ratio_level != "token":
            raise ConfigError("config key 'is_correction' weighs tokens: it needs ratio_level=token")
        if self.dual_clip and self.dual_clip <= 1:
            raise ConfigError(f"config key 'dual_clip' must be > 1 (e.g. 3.0) or 0 (off), got {self.dual_clip}")
        self._check_numbers()

    def _check_off_policy(self) -> None:
        """Asynchronous RL and its correction: one correction, never two; none is a ConfigError when rows lag."""
        lag = self.rollout.max_staleness
        if lag and self.rollout.backend == "local":
            raise ConfigError(f"rollout.max_staleness={lag} overlaps generation with training, and with "
                              "rollout.backend=local both run in this one process: there is nothing to overlap. "
                              "Use rollout.backend=ray or vllm, or rollout.max_staleness=0")
        S = self.rollout.segment_tokens
        if S and S >= self.sampling.max_new_tokens:
            raise ConfigError(f"rollout.segment_tokens={S} must be below sampling.max_new_tokens="
                              f"{self.sampling.max_new_tokens} (a segment that long never parks a completion)")
        if S and self.dynamic_sampling:
            raise ConfigError("rollout.segment_tokens (partial rollouts) with dynamic_sampling is not supported: "
                              "a step trains the groups that finished in it, which dynamic sampling cannot refill "
                              "the same way; use one of them")
        if self.off_policy == "bypass" and self.is_correction != "none":
            raise ConfigError(f"off_policy=bypass takes the behaviour log-probs as π_old, and is_correction="
                              f"{self.is_correction} weighs tokens by π_old/π_behaviour: together they would correct "
                              "twice. Use off_policy=decoupled with is_correction, or bypass with is_correction=none")
        truncated = self.sampling.top_k is not None or (self.sampling.top_p is not None and self.sampling.top_p < 1)
        if self.off_policy == "bypass" and truncated:
            raise ConfigError("off_policy=bypass takes the sampler's log-probs as π_old, and with sampling.top_k / "
                              "top_p they are of the truncated distribution (the ratio starts below 1 on every "
                              "token): use off_policy=decoupled with is_correction, or sampling.top_k=null and "
                              "top_p=null")
        if (lag or self.rollout.segment_tokens) and self.off_policy == "decoupled" and self.is_correction == "none":
            what = f"rollout.max_staleness={lag}" if lag else f"rollout.segment_tokens={self.rollout.segment_tokens}"
            raise ConfigError(f"{what} trains on tokens of older weights: off_policy=decoupled "
                              "needs is_correction=tis (or icepop) to weigh them, or use off_policy=bypass")

    def _check_numbers(self) -> None:
        """Range checks of the numeric fields (after the preset filled its fields)."""
        check_run(self)
        check_range("prompts_per_step", self.prompts_per_step, 1)
        grouped = self.advantage in GROUP_BASELINES
        check_range("samples_per_prompt", self.samples_per_prompt, 1 + grouped,
                    note=f" for advantage '{self.advantage}' (a group of one has no baseline)" if grouped else "")
        for key in ("gamma", "lam"):
            check_range(key, getattr(self, key), 0, 1)
        for key in ("clip_low", "clip_high"):
            check_range(key, getattr(self, key), 0, infinite=True, note=" (.inf: no clipping)")
        for key in ("kl_coef", "entropy_coef", "overlong_factor"):
            check_range(key, getattr(self, key), 0)
        check_range("kl_target", self.kl_target, 0, low_open=True)
        check_range("is_clip", self.is_clip, 1, low_open=True)
        check_range("kl_horizon", self.kl_horizon, 1)
        check_range("reward_timeout", self.reward_timeout, 0, low_open=True)
        check_range("reward_workers", self.reward_workers, 0, note=" (0: rewards run in the trainer's process)")
        check_range("reward_fallback", self.reward_fallback)
        check_range("reward_max_failure_rate", self.reward_max_failure_rate, 0, 1)
        check_range("max_prompt_length", self.max_prompt_length, 0, note=" (0: no limit)")
        check_choice("long_prompts", self.long_prompts, ["truncate", "skip"])
        for name, weight in self.rewards.items():
            check_range(f"rewards.{name}", weight)
        check_range("log_samples_every", self.log_samples_every, 0, note=" (0: never)")
        check_range("mismatch_every", self.mismatch_every, 0, note=" (0: never)")
        check_range("sampling.temperature", self.sampling.temperature, 0, low_open=True,
                    note=" for RL (0 is greedy: a group of identical samples has no signal)")
        if self.overlong == "penalty" and self.overlong_buffer > self.sampling.max_new_tokens:  # the ramp's length
            raise ConfigError(f"config key 'overlong_buffer' ({self.overlong_buffer}) must be at most "
                              f"sampling.max_new_tokens ({self.sampling.max_new_tokens})")


def check_run(config: RunOptions) -> None:
    """The fields every trainer's config shares: step count, checkpointing, resume, threads."""
    check_range("steps", config.steps, 1)
    check_range("epochs", config.epochs, 0, note=" (0: run 'steps')")
    check_range("save_every", config.save_every, 0, note=" (0: only the final checkpoint)")
    check_range("keep_last", config.keep_last, 1)
    check_range("threads", config.threads, 0, note=" (0: torch's default)")
    from posttrain.trainers.model_engine import resolve_device, resolve_precision

    model = getattr(config, "model", None)  # a device this machine lacks, or a precision it cannot do: now
    resolve_precision(config.precision, resolve_device(config.device), model.dtype if model else "float32")
    if not config.resume.strip():
        raise ConfigError(f"config key 'resume' must be 'auto', 'force', 'never' or a checkpoint dir, got "
                          f"{config.resume!r}")
    task = getattr(config, "task", None)
    evaluation = getattr(config, "eval", None)
    if evaluation is not None and evaluation.correct is not None and (task is None or task.name != "dataset"):
        raise ConfigError("config key 'eval.correct' applies to the dataset task (the built-in tasks count a "
                          "sample right by their own reward)")
    if evaluation is not None and evaluation.backend is not None and not hasattr(config, "rollout"):
        raise ConfigError("config key 'eval.backend' applies to RL runs (the others evaluate with the local engine)")
    gsm8k_file = task is not None and task.name == "gsm8k" and Path(task.data or GSM8K_DATA).expanduser().is_file()
    if gsm8k_file and task.test_size == 0:
        raise ConfigError(f"config key 'task.test_size' is 0 with the single data file {task.data}: every row would "
                          "be a test row and none left to train on (set it to the number of test rows)")
