"""Function-preserving rewrites (no quantization inside): equivalence scales/shifts and activation statistics."""

from .equivalence import MIN_SCALE, Edge, Site, fold_edges, init_edge, smooth_scale
from .stats import ChannelStats, collect_input_stats, collect_inputs

__all__ = ["Edge", "Site", "fold_edges", "init_edge", "smooth_scale", "MIN_SCALE", "ChannelStats", "collect_input_stats", "collect_inputs"]
