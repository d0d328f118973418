"""hiresdiff as a ComfyUI custom node pack: clone (or symlink) this repository into ``ComfyUI/custom_nodes/``.

ComfyUI imports this file; the nodes live in :mod:`hiresdiff.comfy.nodes`. hiresdiff is used from the environment
when it is installed there (``pip install hiresdiff[comfyui]``), else from this checkout's ``src`` folder (its
dependencies — diffusers, transformers, safetensors — must be in ComfyUI's environment either way).
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("hiresdiff") is None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from hiresdiff.comfy.nodes import node_mappings

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = node_mappings()
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
