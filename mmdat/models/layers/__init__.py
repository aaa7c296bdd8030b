from .deformable_attention import DeformableAttention
from .mlp import ConvMlp, Mlp
from .neighborhood_attention import NeighborhoodAttention
from .norm import LayerNorm2d
from .residual_dwconv import LocalPerception
from .window_attention import WindowAttention

__all__ = ['DeformableAttention', 'ConvMlp', 'Mlp', 'NeighborhoodAttention', 'LayerNorm2d', 'LocalPerception',
           'WindowAttention']
