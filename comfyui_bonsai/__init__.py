"""ComfyUI node pack for Bonsai 1-bit text-to-image models.

Install: copy or symlink this folder into ComfyUI/custom_nodes/ and `pip install -e /path/to/bonsai`
(a checkout; PyPI's `bonsai` is another project) into ComfyUI's Python environment. The nodes
appear under the "Bonsai" category: on ComfyUI's own types (MODEL, CLIP, VAE, LATENT;
model_nodes.py) and on a whole Bonsai pipeline (nodes.py).
"""

from . import model_nodes, nodes

NODE_CLASS_MAPPINGS = {**model_nodes.NODE_CLASS_MAPPINGS, **nodes.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**model_nodes.NODE_DISPLAY_NAME_MAPPINGS, **nodes.NODE_DISPLAY_NAME_MAPPINGS}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
