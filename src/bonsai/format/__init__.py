"""The Bonsai checkpoint: one safetensors file with a versioned JSON metadata document."""

from .checkpoint import (
    Checkpoint,
    check_finite,
    check_packed_layers,
    load_checkpoint,
    save_checkpoint,
    validate_tensors,
)
from .errors import CheckpointError
from .header import MAX_HEADER_BYTES, Header, TensorInfo, read_header
from .schema import FORMAT_NAME, FORMAT_VERSION, LayerSpec, flatten_layer, validate_metadata
from .summary import summarize

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_HEADER_BYTES",
    "Checkpoint",
    "CheckpointError",
    "Header",
    "LayerSpec",
    "TensorInfo",
    "check_finite",
    "check_packed_layers",
    "flatten_layer",
    "load_checkpoint",
    "read_header",
    "save_checkpoint",
    "summarize",
    "validate_metadata",
    "validate_tensors",
]
