"""λ mixing (GKD semantics): each batch comes from student rollouts with probability λ.

The draw is a pure function of ``(seed, step, micro_batch)``, so it is the same on every rank
(tensor-parallel ranks must see the same tokens), repeats exactly after a resume, and needs no
saved state. Every decision is returned to the caller, which logs it.
"""

from __future__ import annotations

import random

__all__ = ["lambda_draw", "step_rng"]


def step_rng(seed: int, step: int, micro_batch: int, purpose: str) -> random.Random:
    """A generator owned by one (step, micro batch, purpose): stateless determinism."""
    return random.Random(f"{seed}/{purpose}/{step}/{micro_batch}")


def lambda_draw(lmbda: float, *, seed: int, step: int, micro_batch: int = 0) -> bool:
    """True (use student rollouts) with probability ``lmbda``; λ=0 and λ=1 never draw."""
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda must be in [0, 1], got {lmbda!r}")
    if lmbda in (0.0, 1.0):
        return lmbda == 1.0
    return step_rng(seed, step, micro_batch, "lambda").random() < lmbda
