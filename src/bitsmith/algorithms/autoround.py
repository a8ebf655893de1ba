"""AutoRound / SignRound (Cheng et al., arXiv 2309.05516) reproduced as a recipe of the reconstruction trainer:
rounding offsets in [-0.5, 0.5] and min/max scales in [0, 1] trained by signed gradient descent, lr 1/steps
decaying linearly to 0, 200 steps of 8 randomly drawn calibration samples, the parameters of the lowest
mini-batch loss kept (intel/auto-round's defaults). Registers the ``autoround`` method."""

from __future__ import annotations

from .base import Method, register
from .reconstruct.driver import reconstruct_needs, run_reconstruct
from .reconstruct.recipe import ReconstructConfig

AUTOROUND = ReconstructConfig()

register(Method("autoround", run_reconstruct, options=ReconstructConfig, default=lambda act: AUTOROUND,
                needs=reconstruct_needs, learned=lambda rc: rc, v1_key="reconstruct",
                summary="AutoRound/SignRound reproduced (signed-gradient rounding + min/max scales)"))
