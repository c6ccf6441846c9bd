"""RLHF on the training engine (DeepSpeed-Chat's steps, plus DPO): every ZeRO stage, TP,
bf16 and checkpointing work unchanged. See `losses` for the math, `data` for the files."""
from zerojax.rlhf.dpo import dpo
from zerojax.rlhf.reward import RewardModel, reward
from zerojax.rlhf.sft import sft

__all__ = ["RewardModel", "dpo", "reward", "sft"]
