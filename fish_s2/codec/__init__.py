"""The S2-Pro codec: configuration (:mod:`.config`), network (:mod:`.network`), ``codec.pth`` handling
(:mod:`.weights`)."""

from .config import CodecConfig, CodecTransformerConfig, QuantizerConfig, TransformerDefaults
from .network import Codec, WindowLimitedTransformer
from .weights import bake_weight_norm, unwrap_state_dict

__all__ = ["Codec", "CodecConfig", "CodecTransformerConfig", "QuantizerConfig", "TransformerDefaults",
           "WindowLimitedTransformer", "bake_weight_norm", "unwrap_state_dict"]
