"""Test-only ComfyUI nodes for the end-to-end tests (``tests/test_comfy_e2e.py``): the tiny SD twin of
:mod:`comfy_twins` as MODEL and VAE, and seeded CONDITIONING in place of a text encoder — ComfyUI's own loaders
refuse models this small, and no real checkpoint can be downloaded here."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # tests/: comfy_twins

import torch

from comfy_twins import sd_vae, twin


class HiresdiffTestTwin:
    """MODEL, VAE and positive/negative CONDITIONING of the seeded SD twin."""

    CATEGORY = "testing"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "VAE", "CONDITIONING", "CONDITIONING")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def load(self, seed):
        tw = twin("sd", seed)
        _, vae = sd_vae(float(tw.model.latent_format.scale_factor), seed)
        g = torch.Generator().manual_seed(seed + 1)
        positive = [[torch.randn(1, 7, tw.context, generator=g), {}]]
        negative = [[torch.randn(1, 7, tw.context, generator=g), {}]]
        return tw.patcher, vae, positive, negative


NODE_CLASS_MAPPINGS = {"HiresdiffTestTwin": HiresdiffTestTwin}
