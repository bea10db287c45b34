"""The optimizer: the LLaMA paper's recipe (section 2.2) as one optax chain.

clip global norm 1.0 -> AdamW (b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1 on matrices
only) with a learning rate of linear warmup (2000 steps) then cosine decay to 10% of the
peak. The optimizer state is created from the (float32 master) parameters, so it is
float32 too, whatever the compute dtype.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import optax
# jax and optax are imported where used: configs import OptimizerConfig, and a config file
# listed by `train.py --help` should not cost a jax import.


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    peak_lr: float = 3.0e-4        # Table 2: 3.0e-4 (7B, 13B), 1.5e-4 (33B, 65B)
    warmup_steps: int = 2000
    end_lr_fraction: float = 0.1   # cosine ends at 10% of the peak
    total_steps: int = 0           # schedule length; 0: the run's `steps`
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0         # 0: no clipping

    def __post_init__(self):
        if self.peak_lr <= 0 or self.warmup_steps < 0 or self.total_steps < 0:
            raise ValueError(f"OptimizerConfig: need peak_lr > 0, warmup_steps >= 0, total_steps >= 0: {self}")
        if not 0 <= self.end_lr_fraction <= 1:
            raise ValueError(f"OptimizerConfig.end_lr_fraction={self.end_lr_fraction}: must be in [0, 1]")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OptimizerConfig":
        """From a dict or ml_collections ConfigDict; unknown keys are an error."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        known = {f.name for f in dataclasses.fields(cls)}
        if set(d) - known:
            raise ValueError(f"optimizer: unknown keys {sorted(set(d) - known)}; known: {sorted(known)}")
        return cls(**d)


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `peak_lr` over `warmup_steps`, then cosine to
    `end_lr_fraction * peak_lr` at `total_steps` (constant after)."""
    import optax
    steps = cfg.total_steps or total_steps
    if steps <= cfg.warmup_steps:
        raise ValueError(f"schedule of {steps} steps leaves nothing after {cfg.warmup_steps} warmup steps")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=cfg.warmup_steps,
        decay_steps=steps, end_value=cfg.peak_lr * cfg.end_lr_fraction)


def _is_norm(path) -> bool:
    return any("norm" in str(getattr(k, "key", getattr(k, "name", ""))) for k in path)


def decay_mask(params) -> Any:
    """True for the parameters weight decay applies to: matrices (ndim >= 2), not norms.

    Norm weights are [L, D] once layers are stacked, so the name rules them out, not ndim.
    """
    import jax
    return jax.tree_util.tree_map_with_path(lambda p, x: x.ndim >= 2 and not _is_norm(p), params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """The paper's chain: clip by global norm, then AdamW with the decay mask and schedule."""
    import optax
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
