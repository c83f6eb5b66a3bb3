"""Pure tensor math of lightning-spectral: matricizations, bounds, estimates, references.

Nothing here imports Lightning.
"""

from .matricize import grouped_weight, matricize, row_subsets, spatial_dims

__all__ = [
    "grouped_weight",
    "matricize",
    "row_subsets",
    "spatial_dims",
]
