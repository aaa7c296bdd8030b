"""Datasets: the synthetic shapes set of the embedded demo."""
from .shapes import CLASSES as SHAPES_CLASSES, PALETTE as SHAPES_PALETTE, make_shapes_dataset

__all__ = ['SHAPES_CLASSES', 'SHAPES_PALETTE', 'make_shapes_dataset']
