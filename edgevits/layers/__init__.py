"""Building blocks shared by every family: defined once here, imported by the model files."""
from .attention import AdditiveAttention
from .bias import RelPosBiasDeploy, RelPosBias, adapt_bias_tables, bias_index, resize_table
from .conv import (ChannelAffine, ConvNorm, NormLinear, average_linears, channels_last_weights_, conv1x1_to_linear,
                   folded_conv, fuse_bn_conv, fuse_bn_linear, fuse_conv_bn, fuse_linear_bn, merge_convs,
                   scale_output_)
from .kernels import FusedConv, FusedLinear
from .misc import DeployModule, DropPath, LayerScale, check_image_input, to_2tuple
from .mlp import Mlp, PreNormConvMlp

__all__ = [
    "AdditiveAttention", "ChannelAffine", "ConvNorm", "DeployModule", "DropPath", "RelPosBiasDeploy", "FusedConv",
    "FusedLinear", "LayerScale", "Mlp", "NormLinear", "PreNormConvMlp", "RelPosBias", "adapt_bias_tables",
    "average_linears", "bias_index", "channels_last_weights_", "check_image_input", "conv1x1_to_linear",
    "folded_conv", "fuse_bn_conv", "fuse_bn_linear", "fuse_conv_bn", "fuse_linear_bn", "merge_convs",
    "resize_table", "scale_output_", "to_2tuple",
]
