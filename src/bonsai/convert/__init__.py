"""Full-precision model -> Bonsai checkpoint: adapters for diffusers denoisers, streaming
layer-by-layer binarization, and the `bonsai quantize` command."""

from .adapters import ADAPTERS, Adapter, UnsupportedModel, adapter_for
from .convert import quantize_model
from .source import Source, SourceError, open_source
from .stream import ConversionStats, quantize_source

__all__ = [
    "ADAPTERS",
    "Adapter",
    "ConversionStats",
    "Source",
    "SourceError",
    "UnsupportedModel",
    "adapter_for",
    "open_source",
    "quantize_model",
    "quantize_source",
]
