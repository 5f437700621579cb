"""posttrain: post-train language models with SFT and reinforcement learning.

The Python API (:mod:`posttrain.api`): ``from posttrain import GRPOTrainer, SFTTrainer, DPOTrainer, RewardTrainer``
(imported on first use, so ``import posttrain`` stays light).
"""

__version__ = "0.1.0"
__all__ = ["DPOTrainer", "GRPOTrainer", "RewardTrainer", "SFTTrainer"]


def __getattr__(name: str):
    if name in __all__:
        from posttrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'posttrain' has no attribute '{name}'")
