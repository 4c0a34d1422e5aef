"""Reward functions the GRPO and PPO tests load by name (``grpo_rewards:NAME``), as a user's module would be."""

from __future__ import annotations

import time


def starts_with_a(prompt, answer, ended, row):
    return 1.0 if answer.startswith("a") else 0.0


def constant(prompt, answer, ended, row):
    return 0.5


def only_even(prompt, answer, ended, row):
    return None if len(answer) % 2 else 1.0


def broken(prompt, answer, ended, row):
    raise ValueError("no score today")


def ascii_first(prompt, answer, ended, row):
    return 1.0 if answer and ord(answer[0]) < 128 else 0.0


def slow_ascii_first(prompt, answer, ended, row):
    time.sleep(0.03)  # slows a run down enough for a test to kill it mid-way
    return ascii_first(prompt, answer, ended, row)
