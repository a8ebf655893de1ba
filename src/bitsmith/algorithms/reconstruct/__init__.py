"""Learned block reconstruction: the trainer (:mod:`.trainer`), its learnable parameter groups
(:mod:`.learnable`), the recipe that describes a learned method (:mod:`.recipe`) and the block driver every
learned method registers (:mod:`.driver`)."""

from .recipe import ReconstructConfig, reconstruct_block

__all__ = ["ReconstructConfig", "reconstruct_block"]
