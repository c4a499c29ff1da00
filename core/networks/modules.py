"""The loaded model as LoRA files see it: every patchable module by canonical name, and the aliases files use.

A LoRA key names a module of the model it was trained on, in one of several spellings (spec section 2).
This module turns the *model* into a :class:`ModelSignature`: each ``Linear`` / ``Conv2d`` by canonical
name ``(component, path)`` with its weight shape, plus the name tables the layouts need:

- ``component`` is ``unet``, ``te`` (SD 1.x/2.x text encoder; SDXL's first) or ``te2`` (SDXL's second);
  ``path`` is the diffusers module path inside it. Text-encoder paths drop a leading ``text_model.``
  (transformers 4 has it, 5 does not), so files from either era name one module one way.
- **kohya aliases**: ``lora_unet_<path with _>``, and the LDM/SGM spelling of each UNet module
  (``lora_unet_input_blocks_1_1_...``), derived from the UNet's own config, so the mapping is right for
  every block layout (SD 1.x, 2.x, SDXL, the tiny models) instead of a fixed table.
- **cloneofsimo order**: that trainer numbers the ``Linear`` layers inside modules of given classes in
  module-tree order; the order is recorded per ancestor class here.

The signature holds names and shapes only (no tensors), so the LoRA library keeps it while keep-alive
unloads the model and checks files against it without the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

UNET, TE, TE2 = "unet", "te", "te2"
#: kohya prefixes per component and model family.
KOHYA_PREFIXES = {
    "single": {"lora_unet_": UNET, "lora_te_": TE},
    "sdxl": {"lora_unet_": UNET, "lora_te1_": TE, "lora_te2_": TE2},
}
#: diffusers' pipeline attribute per component.
PIPE_ATTR = {UNET: "unet", TE: "text_encoder", TE2: "text_encoder_2"}

_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def strip_text_model(path: str) -> str:
    return path[len("text_model."):] if path.startswith("text_model.") else path


def ldm_prefixes(config: Any) -> dict[str, str]:
    """diffusers UNet block prefix -> LDM/SGM prefix, from the UNet config (block types, layers per block)."""
    down = list(config.down_block_types)
    up = list(config.up_block_types)
    lpb = config.layers_per_block
    lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * len(down)
    out = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2",
           "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
           "mid_block.resnets.1": "middle_block.2"}
    index = 1
    for i, kind in enumerate(down):
        for j in range(lpb[i]):
            out[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            if "CrossAttn" in kind:
                out[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if i < len(down) - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    index = 0
    rev = list(reversed(lpb))
    for i, kind in enumerate(up):
        for j in range(rev[i] + 1):
            out[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            if "CrossAttn" in kind:
                out[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == rev[i] and i < len(up) - 1:
                out[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{index}.{2 if 'CrossAttn' in kind else 1}.conv"
            index += 1
    return out


def ldm_name(path: str, prefixes: dict[str, str]) -> str | None:
    """The LDM/SGM spelling of diffusers UNet module ``path``, or None when it has none."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            rest = parts[cut:]
            if ".resnets." in f".{head}." and rest:
                mapped = _RESNET_LDM.get(rest[0])
                if mapped is None:
                    return None
                rest = [mapped, *rest[1:]]
            return ".".join([prefixes[head], *rest])
    return None


@dataclass(frozen=True)
class ModuleInfo:
    kind: str  # "linear" | "conv"
    shape: tuple[int, ...]


@dataclass
class ModelSignature:
    """Names and shapes of every patchable module of one model (see module docstring)."""

    family: str  # "sd1" | "sd2" | "sdxl"
    modules: dict[tuple[str, str], ModuleInfo] = field(default_factory=dict)
    #: ``lora_unet_down_blocks_0_...`` (and LDM spellings) -> canonical name.
    kohya: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: component -> [(ancestor class names, [canonical child Linear paths in order])] for cloneofsimo.
    clone_ancestors: dict[str, list[tuple[frozenset[str], list[str]]]] = field(default_factory=dict)
    #: text-encoder widths and the UNet cross-attention width (base-model checks).
    widths: dict[str, int] = field(default_factory=dict)

    @property
    def prefixes(self) -> dict[str, str]:
        return KOHYA_PREFIXES["sdxl" if self.family == "sdxl" else "single"]

    def clone_order(self, component: str, classes: set[str]) -> list[str]:
        """cloneofsimo's numbering of ``component``'s Linear layers for ancestor classes ``classes``."""
        wanted = {_norm_class(c) for c in classes}
        return [p for names, paths in self.clone_ancestors.get(component, []) if names & wanted for p in paths]


def _norm_class(name: str) -> str:
    return "Attention" if name == "CrossAttention" else name


def _class_names(module: torch.nn.Module) -> frozenset[str]:
    return frozenset(_norm_class(c.__name__) for c in type(module).__mro__ if c is not torch.nn.Module
                     and c is not object)


_CLONE_CLASSES = {"Attention", "GEGLU", "CLIPAttention", "CLIPMLP", "FeedForward"}


def _old_block_order(ancestors: list[tuple[frozenset[str], list[str]]]) -> list[tuple[frozenset[str], list[str]]]:
    """diffusers before 0.12 registered a transformer block's ``attn1``, ``ff``, ``attn2`` in that order, and
    cloneofsimo files number their layers so; today's blocks register ``attn1``, ``attn2``, ``ff``."""
    rank = {"attn1": 0, "ff": 1, "attn2": 2}

    def key(item: tuple[int, tuple[frozenset[str], list[str]]]) -> tuple:
        index, (_, paths) = item
        head, _, rest = paths[0].partition(".transformer_blocks.") if paths else ("", "", "")
        if not rest:
            return (index, 0)
        number, _, tail = rest.partition(".")
        return (f"{head}.{number}", rank.get(tail.split(".")[0], 3))

    blocks: dict[str, int] = {}
    keyed = []
    for index, item in enumerate(ancestors):
        block, sub = key((index, item))
        first = blocks.setdefault(str(block), index)
        keyed.append(((first, sub, index), item))
    return [item for _, item in sorted(keyed, key=lambda pair: pair[0])]


def signature_of(pipe: Any, family: str) -> ModelSignature:
    """Build the signature of a diffusers pipeline's UNet and text encoder(s)."""
    sig = ModelSignature(family)
    prefixes = sig.prefixes
    reverse = {component: prefix for prefix, component in prefixes.items()}
    for component, attr in PIPE_ATTR.items():
        root = getattr(pipe, attr, None)
        if root is None:
            continue
        root = getattr(root, "_orig_mod", root)  # a torch.compile'd module: name the original's modules
        ldm = ldm_prefixes(root.config) if component == UNET else {}
        ancestors: list[tuple[frozenset[str], list[str]]] = []
        for name, module in root.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                path = strip_text_model(name) if component != UNET else name
                kind = "linear" if isinstance(module, torch.nn.Linear) else "conv"
                sig.modules[(component, path)] = ModuleInfo(kind, tuple(module.weight.shape))
                prefix = reverse[component]
                sig.kohya[prefix + path.replace(".", "_")] = (component, path)
                if component != UNET:
                    sig.kohya[prefix + "text_model_" + path.replace(".", "_")] = (component, path)
                else:
                    alias = ldm_name(path, ldm)
                    if alias is not None:
                        sig.kohya.setdefault(prefix + alias.replace(".", "_"), (component, path))
            names = _class_names(module)
            if names & _CLONE_CLASSES:
                children = [strip_text_model(f"{name}.{child}") if component != UNET else f"{name}.{child}"
                            for child, sub in module.named_modules() if isinstance(sub, torch.nn.Linear)]
                ancestors.append((names, children))
        sig.clone_ancestors[component] = _old_block_order(ancestors) if component == UNET else ancestors
        if component != UNET:
            sig.widths[component] = int(root.config.hidden_size)
        else:
            sig.widths["cross"] = int(root.config.cross_attention_dim)
    return sig


def resolve_module(pipe: Any, component: str, path: str) -> torch.nn.Module:
    """The live module for a canonical name (the inverse of :func:`signature_of`'s naming)."""
    root = getattr(pipe, PIPE_ATTR[component])
    root = getattr(root, "_orig_mod", root)
    if component != UNET and hasattr(root, "text_model"):
        root = root.text_model
    return root.get_submodule(path)
