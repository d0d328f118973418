"""A ComfyUI UNet seen under diffusers' module names, so the UNet-patch methods run on it unchanged.

hiresdiff's model patches (:mod:`hiresdiff.patches`: ScaleCrafter's re-dilation, FouriScale's low-passed dilated
convs and shared Q/K, HiDiffusion's RAU-Net and MSW-MSA, FreeU) address a UNet by level
(:mod:`hiresdiff.patches.levels`), which resolves to the module names of a diffusers ``UNet2DConditionModel``.
ComfyUI's UNet (``openaimodel.UNetModel``) holds the same modules in another tree: flat ``input_blocks`` (a resnet
and its transformer per entry, a downsampler alone), a ``middle_block`` and flat ``output_blocks`` (a resnet, its
transformer and the level's upsampler). :class:`ComfyUNetView` walks that tree by module kind and offers what the
patch seam reads (:func:`~hiresdiff.patches.context.patched`):

* ``named_modules()`` / ``get_submodule(name)`` under diffusers' names — the modules themselves are ComfyUI's, so a
  patch that replaces a module's ``forward`` or sets a conv's dilation acts on the model ComfyUI runs (and is
  restored when the patch context ends). The correspondence: ``down_blocks.ℓ.resnets.j`` is the ``ResBlock`` of
  the j-th input block of level ℓ, its ``conv1``/``conv2`` that block's ``in_layers.2``/``out_layers.3``;
  ``…attentions.j`` the ``SpatialTransformer`` beside it; ``down_blocks.ℓ.downsamplers.0.conv`` the
  ``Downsample``'s ``op``; ``mid_block`` the middle block's resnets and transformer; ``up_blocks.i`` the output
  blocks of level L−1−i, ``upsamplers.0.conv`` their ``Upsample``'s ``conv``. ``down_blocks.ℓ``/``up_blocks.i``
  exist as names (sub-paths such as ``down1:attentions.0`` start there) but have no ComfyUI module of their own;
* ``config``: the diffusers config keys the patches read (``block_out_channels``, ``layers_per_block``,
  ``cross_attention_dim``), from the model's ``unet_config``;
* ``attn_processors`` / ``set_attn_processor``: a self-attention processor that is a q, k, v kernel
  (:class:`~hiresdiff.patches.processors.SelfAttentionKernel`: MSW-MSA, FouriScale's shared Q/K) becomes ComfyUI's
  ``attn1`` replacement of that transformer block (the adapter's ``attn1``, with the replacement in force before
  as its fallback). One that works on whole attention calls (a
  :class:`~hiresdiff.patches.processors.SelfAttentionPatch` such as FreeScale's scale fusion, which fuses outputs
  after the output projection) takes the place of the ComfyUI ``attn1`` module's ``forward``: it gets the module as
  diffusers' ``attn`` and, as the processor it wraps, :class:`ComfyAttentionCall` — the module's own attention
  (projections, ComfyUI's attention function, output projection) on the tokens it is given. ComfyUI bypasses a
  module's ``forward`` where another node replaces that block's ``attn1``, so such a block is refused in one line;
* ``num_upsamplers`` (HiDiffusion raises it so diffusers passes each upsampler its skip's size): ComfyUI always
  passes that size (``output_shape``), so the attribute is kept here and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import SimpleNamespace
from typing import Any

from torch import nn

from hiresdiff.comfy.attention import ComfyKernelAttention, comfy_attention, installed_replacement
from hiresdiff.errors import HiresError, require
from hiresdiff.patches.processors import SelfAttentionKernel, SelfAttentionPatch

#: diffusers' names of a resnet's convs → their path inside ComfyUI's ``ResBlock``
RESNET_CONVS = {"conv1": "in_layers.2", "conv2": "out_layers.3"}
#: ComfyUI's name of the top-level lists → the block name of its ``attn1`` replacement keys
BLOCK_NAMES = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}
#: diffusers' names of levels and groups, which have no ComfyUI module of their own
_GROUP = object()


def _kind(module: nn.Module) -> str:
    return type(module).__name__


def _parts(block: nn.Module) -> dict[str, tuple[int, nn.Module]]:
    """The resnet, transformer, downsampler and upsampler of one ComfyUI block, by kind, with their index."""
    found: dict[str, tuple[int, nn.Module]] = {}
    for index, part in enumerate(block):
        kind = _kind(part)
        if kind in ("ResBlock", "SpatialTransformer", "Downsample", "Upsample"):
            found[kind] = (index, part)
    return found


def diffusers_names(unet: nn.Module) -> dict[str, str]:
    """diffusers module name → ComfyUI module name (``""`` for a level or group without one) of a ComfyUI UNet, in
    diffusers' module order (down blocks, up blocks, mid block)."""
    names: dict[str, str] = {}

    def resnet(prefix: str, comfy: str) -> None:
        names[prefix] = comfy
        for ours, theirs in RESNET_CONVS.items():
            names[f"{prefix}.{ours}"] = f"{comfy}.{theirs}"

    def transformer(prefix: str, comfy: str, module: nn.Module) -> None:
        names[prefix] = comfy
        for t in range(len(getattr(module, "transformer_blocks", ()))):
            names[f"{prefix}.transformer_blocks.{t}"] = f"{comfy}.transformer_blocks.{t}"
            names[f"{prefix}.transformer_blocks.{t}.attn1"] = f"{comfy}.transformer_blocks.{t}.attn1"

    def layer(prefix: str, j: int, comfy: str, parts: dict[str, tuple[int, nn.Module]]) -> None:
        """The j-th resnet of a diffusers block and the transformer beside it, from one ComfyUI block's parts."""
        if "ResBlock" in parts:
            resnet(f"{prefix}.resnets.{j}", f"{comfy}.{parts['ResBlock'][0]}")
        if "SpatialTransformer" in parts:
            index, module = parts["SpatialTransformer"]
            transformer(f"{prefix}.attentions.{j}", f"{comfy}.{index}", module)

    def sampler(prefix: str, comfy: str, conv: str) -> None:
        names[prefix], names[f"{prefix}.conv"] = comfy, f"{comfy}.{conv}"

    level, j = 0, 0
    names["down_blocks.0"] = ""
    for k, block in enumerate(unet.input_blocks):
        parts = _parts(block)
        if "Downsample" in parts:
            sampler(f"down_blocks.{level}.downsamplers.0", f"input_blocks.{k}.{parts['Downsample'][0]}", "op")
            level, j = level + 1, 0
            names[f"down_blocks.{level}"] = ""
        elif "ResBlock" in parts:
            layer(f"down_blocks.{level}", j, f"input_blocks.{k}", parts)
            j += 1
    up, j = 0, 0
    names["up_blocks.0"] = ""
    blocks = list(unet.output_blocks)
    for k, block in enumerate(blocks):
        parts = _parts(block)
        layer(f"up_blocks.{up}", j, f"output_blocks.{k}", parts)
        j += 1
        if "Upsample" in parts:
            sampler(f"up_blocks.{up}.upsamplers.0", f"output_blocks.{k}.{parts['Upsample'][0]}", "conv")
            if k + 1 < len(blocks):
                up, j = up + 1, 0
                names[f"up_blocks.{up}"] = ""
    middle = getattr(unet, "middle_block", None)
    if middle is not None:
        names["mid_block"] = ""
        r = 0
        for index, part in enumerate(middle):
            if _kind(part) == "ResBlock":
                resnet(f"mid_block.resnets.{r}", f"middle_block.{index}")
                r += 1
            elif _kind(part) == "SpatialTransformer":
                transformer("mid_block.attentions.0", f"middle_block.{index}", part)
    return names


def block_key(comfy_name: str) -> tuple[str, int, int]:
    """ComfyUI's ``attn1`` replacement key of the self-attention at ``comfy_name``
    (``input_blocks.4.1.transformer_blocks.0.attn1`` → ``("input", 4, 0)``; the middle block's number is 0)."""
    parts = comfy_name.split(".")
    top = parts[0]
    number = 0 if top == "middle_block" else int(parts[1])
    return BLOCK_NAMES[top], number, int(parts[parts.index("transformer_blocks") + 1])


class ComfyAttentionCall:
    """The plain attention of one ComfyUI ``attn1`` module with diffusers' processor signature (module docstring):
    ``(attn, hidden_states, encoder_hidden_states, attention_mask)`` → the module class's own ``forward`` (never a
    patched one), with the ``transformer_options`` of the call in progress (:attr:`options`)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.options: dict[str, Any] = {}

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, attention_mask: Any = None,
                 *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        own = type(self.module).forward
        return own(self.module, hidden_states, context=encoder_hidden_states, mask=attention_mask,
                   transformer_options=self.options)  # fmt: skip


def _processor_forward(module: nn.Module, processor: SelfAttentionPatch, plain: ComfyAttentionCall) -> Any:
    """The ``forward`` of a ComfyUI ``attn1`` module running ``processor`` (diffusers' processor call) on its
    self-attention calls; calls with other keys or values (another node's ``attn1`` patch) run the module's own."""

    def forward(x: Any, context: Any = None, value: Any = None, mask: Any = None,
                transformer_options: dict[str, Any] | None = None) -> Any:  # fmt: skip
        plain.options = transformer_options if transformer_options is not None else {}
        if context is not None or value is not None:
            return plain(module, x, context, mask)
        return processor(module, x, None, mask)

    return forward


class ComfyUNetView:
    """``adapter``'s ComfyUI UNet (``adapter.diffusion_model``) under diffusers' names (module docstring)."""

    def __init__(self, unet: nn.Module, adapter: Any) -> None:
        self.comfy, self.adapter = unet, adapter
        self.names = diffusers_names(unet)
        cfg = adapter.model.model_config.unet_config
        mults = list(cfg.get("channel_mult", ()))
        self.config = SimpleNamespace(
            block_out_channels=tuple(int(cfg["model_channels"]) * int(m) for m in mults),
            layers_per_block=cfg.get("num_res_blocks", 1),
            cross_attention_dim=cfg.get("context_dim"),
            down_block_types=("DownBlock2D",) * len(mults),  # only their number is read (the levels)
        )
        self.down_blocks = [name for name in self.names if name.count(".") == 1 and name.startswith("down_blocks")]
        self.num_upsamplers = len(self.down_blocks) - 1
        #: the self-attention kernels installed through :meth:`set_attn_processor`, by diffusers' ``attn1`` name
        self._kernels: dict[str, SelfAttentionKernel] = {}
        self._before: dict[Any, Any] | None = None
        #: whole-call processors in place of ``attn1`` modules' ``forward`` (name → (module, forward before))
        self._wrapped: dict[str, tuple[SelfAttentionPatch, nn.Module, Any]] = {}
        #: the plain attention of every ``attn1`` module, as diffusers' processor (what a wrapping patch wraps)
        self._plain = {n: ComfyAttentionCall(self.get_submodule(n)) for n in self.names if n.endswith(".attn1")}

    def named_modules(self) -> Iterator[tuple[str, Any]]:
        """(diffusers name, module) of every module the patches address; levels and groups map to a marker."""
        yield "", self
        for name, comfy in self.names.items():
            yield name, self.comfy.get_submodule(comfy) if comfy else _GROUP

    def get_submodule(self, name: str) -> Any:
        if name == "":
            return self
        comfy = self.names.get(name)
        if comfy is None:
            raise HiresError(f"this ComfyUI UNet has no module diffusers calls {name!r}")
        require(comfy != "", f"diffusers' {name!r} is a group of modules in ComfyUI's UNet, not one module")
        return self.comfy.get_submodule(comfy)

    @property
    def attn_processors(self) -> dict[str, Any]:
        """diffusers' ``attn1`` processor names → the patch installed there, else the module's plain attention
        (:class:`ComfyAttentionCall`)."""
        wrapped = {n: entry[0] for n, entry in self._wrapped.items()}
        return {f"{n}.processor": self._kernels.get(n) or wrapped.get(n) or plain for n, plain in self._plain.items()}

    def set_attn_processor(self, processors: Mapping[str, Any]) -> None:
        """Install ``processors`` (diffusers' ``….attn1.processor`` names; module docstring): kernels as ComfyUI
        ``attn1`` replacements of their blocks, whole-call patches in place of the modules' ``forward``; a plain
        entry (``None``, :class:`ComfyAttentionCall`) leaves its block to the attention in force before."""
        kernels: dict[str, SelfAttentionKernel] = {}
        whole: dict[str, SelfAttentionPatch] = {}
        for full, processor in processors.items():
            name = full.removesuffix(".processor")
            if processor is None or isinstance(processor, ComfyAttentionCall):
                continue
            require(
                isinstance(processor, SelfAttentionPatch),
                f"{type(processor).__name__} works on diffusers' attention processors and cannot run in ComfyUI",
            )
            (kernels if isinstance(processor, SelfAttentionKernel) else whole)[name] = processor
        if self._before is None:
            self._before = dict(self.adapter.attn1)
        options = self.adapter.patcher.model_options.get("transformer_options", {})
        installed = {**options.get("patches_replace", {}).get("attn1", {}), **self._before}
        ours = {}
        for name, kernel in kernels.items():
            key = block_key(self.names[name])
            ours[key] = ComfyKernelAttention(kernel, installed_replacement(installed, key))
        for name, processor in whole.items():
            if installed_replacement(installed, block_key(self.names[name])) is not comfy_attention:
                raise HiresError(
                    f"another node replaces the self-attention at {self.names[name]}; "
                    f"{type(processor).__name__} needs ComfyUI's own attention there"
                )
        self.adapter.attn1 = {**self._before, **ours}
        self._kernels = kernels
        self._wrap(whole)
        if not kernels:
            self._before = None

    def _wrap(self, whole: Mapping[str, SelfAttentionPatch]) -> None:
        """Put the whole-call patches ``whole`` in place of their modules' ``forward`` (the earlier ones undone)."""
        for module, before in ((m, f) for _, m, f in self._wrapped.values()):
            if before is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = before
        self._wrapped = {}
        for name, processor in whole.items():
            module = self.get_submodule(name)
            self._wrapped[name] = (processor, module, module.__dict__.get("forward"))
            module.forward = _processor_forward(module, processor, self._plain[name])
