"""Building blocks shared by every family: defined once here, imported by the model files."""
from .attention import AdditiveAttention
from .bias import FrozenRelPosBias, RelPosBias, adapt_bias_tables, bias_index, resize_table
from .conv import (ChannelAffine, ConvNorm, NormLinear, average_linears, conv1x1_to_linear, fuse_bn_conv,
                   fuse_bn_linear, fuse_conv_bn, fuse_linear_bn, scale_output_)
from .misc import DropPath, LayerScale, check_image_input, to_2tuple
from .mlp import Mlp, PreNormConvMlp

__all__ = [
    "AdditiveAttention", "ChannelAffine", "ConvNorm", "DropPath", "FrozenRelPosBias", "LayerScale", "Mlp", "NormLinear",
    "PreNormConvMlp", "RelPosBias", "adapt_bias_tables", "average_linears", "bias_index", "check_image_input",
    "conv1x1_to_linear",
    "fuse_bn_conv", "fuse_bn_linear", "fuse_conv_bn", "fuse_linear_bn", "resize_table", "scale_output_", "to_2tuple",
]
