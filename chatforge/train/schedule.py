"""Learning-rate schedules: linear warmup, then cosine decay, warmup-stable-decay or constant.

All return a multiplier of the peak LR for a 0-based optimizer step; ``min_lr_frac``
is the floor they decay to. WSD (warmup-stable-decay, as in MiniCPM and nanochat)
holds the peak until the last ``decay_frac`` of training, then decays linearly;
unlike cosine, its stable phase does not depend on knowing the run length early.
"""

from __future__ import annotations

import math

from chatforge.errors import ConfigError


def lr_multiplier(step: int, max_steps: int, warmup_steps: int, schedule: str, min_lr_frac: float,
                  decay_frac: float = 0.2) -> float:
    """Multiplier in [min_lr_frac, 1] (during warmup, in (0, 1]) of the peak LR at ``step``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, round(decay_frac * max_steps))
        decay_start = max(warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1.0 - (1 - min_lr_frac) * progress
    raise ConfigError(f"schedule: {schedule!r} is not allowed; allowed: cosine, wsd, constant")
