"""posttrain: post-train language models with SFT and reinforcement learning."""

__version__ = "0.1.0"
