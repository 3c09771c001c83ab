"""ComfyUI node pack for Bonsai 1-bit text-to-image models.

Install: copy or symlink this folder into ComfyUI/custom_nodes/ and `pip install bonsai` into
ComfyUI's Python environment. The nodes appear under the "Bonsai" category.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
