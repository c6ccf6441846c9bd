"""Programmatic rewards for the shipped PPO / GRPO toy task (configs/rlhf/grpo.json, ppo.json).

A reward function has TRL's shape: `fn(prompts, completions, **columns) -> list[float]`,
where `completions` are the generated texts (no prompt; ended at EOS or a stop string) and
each other field of the prompt file's lines arrives as a keyword list.
"""
from __future__ import annotations


def digit_share(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """The share of a completion's characters that are digits (0 for an empty one)."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


def length_match(prompts: list[str], completions: list[str], target_len: list[int], **columns) -> list[float]:
    """1 at exactly `target_len` characters, falling linearly to 0 at twice as far."""
    return [max(0.0, 1.0 - abs(len(text) - target) / target) for text, target in zip(completions, target_len)]
