"""bitsmith's default recipe (``--method bitsmith``): the combination that measured best (benchmarks/RESULTS.md
"Default recipe v2", README "The default recipe").

SignRound's parameter groups (rounding offsets + min/max scales) trained by Adam on the token-normalised block
loss, 150 steps, the parameters of the lowest full-calibration loss (checked every 50 steps) kept; with quantized
activations (or KV cache) also OmniQuant's LET, by signed gradient descent; then 30 steps of end-to-end norm
tuning toward the full-precision model's next-token distribution. Power-of-two-constrained scales (M1/M2) keep
their min/max (``clip_pow2=False``). Registers the ``bitsmith`` method.
"""

from __future__ import annotations

from .base import DEFAULT_METHOD, Method, register
from .reconstruct.driver import reconstruct_needs, run_reconstruct
from .reconstruct.recipe import ReconstructConfig

BITSMITH = ReconstructConfig(steps=150, optimizer="adamw", let_optimizer="signsgd", loss="token_mse", best="eval",
                             eval_every=50, e2e_steps=30, e2e_lr=0.05, clip_pow2=False)


def default_options(act: bool) -> ReconstructConfig:
    """The default recipe for a setting: with quantized activations (``act``) it learns LET too."""
    return BITSMITH.replace(let=True) if act else BITSMITH


register(Method(DEFAULT_METHOD, run_reconstruct, options=ReconstructConfig, default=default_options,
                needs=reconstruct_needs, learned=lambda rc: rc, v1_key="reconstruct",
                summary="bitsmith's default: learned rounding + clipping (+ LET with activations), end-to-end tuning"))
