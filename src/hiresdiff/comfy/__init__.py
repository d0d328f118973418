"""hiresdiff inside ComfyUI: the model backend over ComfyUI's loaded models (:mod:`hiresdiff.comfy.adapter`)."""
