"""Datasets: the synthetic shapes set of the embedded demo."""
from .shapes import CLASSES as SHAPES_CLASSES
from .shapes import PALETTE as SHAPES_PALETTE
from .shapes import make_shapes_dataset

__all__ = ['SHAPES_CLASSES', 'SHAPES_PALETTE', 'make_shapes_dataset']
