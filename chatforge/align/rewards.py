"""Reward functions for on-policy alignment (GRPO): SupportWorld's checks, or a user's ``module:function``.

A reward function gets the prompt messages, the generated answer, whether the answer
ended its turn, and the data row (its metadata: SupportWorld's rows carry the record and
intent) and returns a number, or None when it cannot score that answer (such answers are
masked out of the update, never scored 0). Several are combined with weights:
``grpo.rewards = ["checks", "mypkg.rewards:polite"]``, ``grpo.reward_weights = [1.0, 0.5]``;
an answer gets the weighted mean of the functions that scored it.

``reward_model`` (the run's reward model, ``align/reward/model``) or ``reward_model:DIR``: a
trained reward model's score of the answer, read at its end-of-turn token (the answer is
rendered as a whole turn).

``checks``: the share of SupportWorld's checks (status, order number, name, intent handled,
no other customer's data, turn ended) that apply to the row and pass; None for a row the
checks cannot read. A function that raises stops the run with an error naming it and the
row, rather than being taken for a low reward.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chatforge.errors import ChatforgeError, ConfigError

RewardFn = Callable[[list[dict[str, Any]], str, bool, dict[str, Any]], "float | None"]


def checks_reward(data: str) -> RewardFn:
    """SupportWorld's checks on ``data`` (its ``supportworld.json`` describes the world) as a reward in [0, 1]."""
    from chatforge.eval.checks import SupportChecks

    checks = SupportChecks.for_data(data)

    def reward(prompt: list[dict[str, Any]], answer: str, ended: bool, row: dict[str, Any]) -> float | None:
        try:
            verdict = checks.check(row, answer, ended)
        except ChatforgeError:
            return None  # not a SupportWorld support row: cannot be scored
        applied = [v for v in verdict.values() if v is not None]
        return sum(applied) / len(applied) if applied else None

    return reward


def reward_model_reward(directory: Path, policy_dir: Path | None = None) -> RewardFn:
    """A trained reward model (``align reward``) as a reward function; refuses another tokenizer than the
    policy's when ``policy_dir`` is given."""
    from chatforge.align.reward import load_reward_model, require_same_tokenizer, score_answers

    if not (Path(directory) / "config.json").is_file():
        raise ConfigError(f"rewards: no reward model at {directory} (train one with `chatforge align reward`)")
    if policy_dir is not None:
        require_same_tokenizer(Path(directory), Path(policy_dir))
    model, tok = load_reward_model(Path(directory))

    def reward(prompt: list[dict[str, Any]], answer: str, ended: bool, row: dict[str, Any]) -> float | None:
        return score_answers(model, tok, [(prompt, answer)])[0]

    return reward


def load_reward_fn(name: str, data: str, run_dir: Path | None = None, policy_dir: Path | None = None) -> RewardFn:
    """``checks``, ``reward_model[:DIR]`` or a ``package.module:function`` importable from the current
    environment."""
    if name == "checks":
        return checks_reward(data)
    if name == "reward_model" or name.startswith("reward_model:"):
        directory = Path(name.partition(":")[2]) if ":" in name else \
            (Path(run_dir) / "align" / "reward" / "model" if run_dir is not None else None)
        if directory is None:
            raise ConfigError("rewards: 'reward_model' needs a run (or name the directory: reward_model:DIR)")
        return reward_model_reward(directory, policy_dir)
    module, sep, function = name.partition(":")
    if not sep or not module or not function:
        raise ConfigError(f"grpo.rewards: {name!r} is neither 'checks', 'reward_model[:DIR]' nor "
                          "'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"grpo.rewards: cannot load {name!r}: {e}") from e
    if not callable(fn):
        raise ConfigError(f"grpo.rewards: {name!r} is not callable")
    return fn


class CombinedReward:
    """The weighted mean of several reward functions over those that scored the answer (None if none did)."""

    def __init__(self, names: Sequence[str], weights: Sequence[float], data: str, run_dir: Path | None = None,
                 policy_dir: Path | None = None):
        if not names:
            raise ConfigError("grpo.rewards: give at least one reward function")
        if weights and len(weights) != len(names):
            raise ConfigError(f"grpo.reward_weights: {len(weights)} weights for {len(names)} reward functions")
        self.names = list(names)
        self.weights = list(weights) or [1.0] * len(names)
        self.fns = [load_reward_fn(n, data, run_dir, policy_dir) for n in names]

    def __call__(self, prompt: list[dict[str, Any]], answer: str, ended: bool, row: dict[str, Any],
                 where: str = "") -> float | None:
        total, weight = 0.0, 0.0
        for name, w, fn in zip(self.names, self.weights, self.fns):
            try:
                value = fn(prompt, answer, ended, row)
            except Exception as e:  # a broken reward must not pass for a low one
                raise ChatforgeError(f"reward function {name!r} raised on {where or 'a row'}: "
                                     f"{type(e).__name__}: {e}") from e
            if value is None:
                continue
            total, weight = total + w * float(value), weight + w
        return total / weight if weight else None
