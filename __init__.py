"""hiresdiff as a ComfyUI custom node pack: clone (or symlink) this repository into ``ComfyUI/custom_nodes/``.

ComfyUI imports this file; the nodes live in :mod:`hiresdiff.comfy.nodes`. The package is taken from this
checkout's ``src`` folder (put first on the path: ComfyUI also puts ``custom_nodes`` on it, where this folder itself
may be called ``hiresdiff``), else from the environment (a pip-installed hiresdiff, whose ``hiresdiff
comfyui-install`` writes a folder of its own instead); its dependencies — diffusers, transformers, safetensors —
must be in ComfyUI's environment either way.
"""

import os
import sys

_SRC = os.path.join(os.path.dirname(os.path.realpath(__file__)), "src")
if os.path.isdir(os.path.join(_SRC, "hiresdiff")) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from hiresdiff.comfy.nodes import node_mappings  # noqa: E402

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = node_mappings()
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
