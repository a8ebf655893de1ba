"""Function-preserving rewrites (no quantization inside): equivalence scales/shifts and activation statistics."""

from .equivalence import MIN_SCALE, Edge, Site, fold_edges
from .stats import ChannelStats, collect_input_stats

__all__ = ["Edge", "Site", "fold_edges", "MIN_SCALE", "ChannelStats", "collect_input_stats"]
