"""RLHF on the training engine (DeepSpeed-Chat's three steps, plus DPO and GRPO): every
ZeRO stage, TP, bf16 and checkpointing work unchanged. See `losses` for the math, `data`
for the files, `online` and `rollout` for what PPO and GRPO share."""
from zerojax.rlhf.dpo import dpo
from zerojax.rlhf.grpo import grpo
from zerojax.rlhf.ppo import ppo
from zerojax.rlhf.reward import RewardModel, reward
from zerojax.rlhf.sft import sft

__all__ = ["RewardModel", "dpo", "grpo", "ppo", "reward", "sft"]
