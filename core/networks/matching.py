"""Which model a LoRA was made for, and which of its groups land on which module of the loaded model.

Both answers come from names and shapes only. The base model is read from shapes first (text-encoder
width 768 / 1024 / 768+1280, UNet cross-attention width 768 / 1024 / 2048), then from the
``ss_base_model_version`` / ``modelspec.architecture`` metadata; a file for another family than the
model's is skipped with both named. Each group is then resolved to a canonical module (kohya aliases,
canonical paths, cloneofsimo numbering) and its tensor shapes checked against that module's weight, so a
delta is never applied to a module it does not fit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from sdrepl.core.networks.layouts import Group, Parsed, clone_classes
from sdrepl.core.networks.modules import TE, TE2, UNET, ModelSignature

FAMILY_LABEL = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
_CROSS = re.compile(r"attn2[._](?:processor[._])?to_k")


def _in_width(group: Group, shapes: dict[str, tuple[int, ...]]) -> int | None:
    for role in ("down", "w1b", "diff"):
        if role in group.keys:
            shape = shapes[group.keys[role]]
            return shape[1] if len(shape) > 1 else None
    return None


def guess_base(parsed: Parsed, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> str | None:
    """"sd1" / "sd2" / "sdxl" for the model the file was trained on, or None when nothing tells."""
    components = {g.component for g in parsed.groups}
    if TE2 in components or any("clip_g" in e for e in parsed.embeddings.values()):
        return "sdxl"
    for group in parsed.groups:
        if group.component == UNET and _CROSS.search(group.written):
            width = _in_width(group, shapes)
            found = {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(width or 0)
            if found:
                return found
    for group in parsed.groups:
        if group.component == TE and re.search(r"(self_attn[._](q|k|v)_proj|:\d+$)", group.written):
            found = {768: "sd1", 1024: "sd2"}.get(_in_width(group, shapes) or 0)
            if found:
                return found
    text = (metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")).lower()
    if "xl" in text:
        return "sdxl"
    if re.search(r"v2|_2\.|-2\.|sd2", text) or metadata.get("ss_v2", "").lower() == "true":
        return "sd2"
    if re.search(r"v1|sd1|_1\.", text):
        return "sd1"
    return None


@dataclass
class Match:
    """A parsed file against one model: the groups that land, and an account of those that do not."""

    targets: list[tuple[Group, tuple[str, str]]] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # reasons, one per group that found no module
    keys_matched: int = 0

    def per_group(self) -> dict[str, int]:
        """Matched keys per module group (``unet down_blocks.0``, ``te layers``) for ``!show``."""
        counts: dict[str, int] = {}
        for group, (component, path) in self.targets:
            parts = path.split(".")
            if component == UNET:
                head = ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]
            else:
                head = "encoder layers" if parts[:2] == ["encoder", "layers"] else parts[0]
            label = f"{component} {head}"
            counts[label] = counts.get(label, 0) + len(group.keys)
        return counts


def _fits(group: Group, shapes: dict[str, tuple[int, ...]], weight: tuple[int, ...]) -> str | None:
    """Why the group's tensors do not make a delta of shape ``weight``, or None when they do."""
    s = {role: shapes[key] for role, key in group.keys.items()}
    out, inner = weight[0], math.prod(weight[1:])
    kernel = weight[2:] if len(weight) == 4 else ()
    if group.algo == "lora":
        down, up = s["down"], s["up"]
        got_out, got_in = up[0], down[1] if len(down) > 1 else -1
        down_kernel = tuple(s["mid"][2:]) if "mid" in s else tuple(down[2:])
        if got_out != out or got_in != weight[1] or (kernel and down_kernel not in (kernel, ())) or (
                not kernel and len(down_kernel) and math.prod(down_kernel) != 1):
            return f"LoRA makes [{got_out}, {got_in}{', ' + ', '.join(map(str, down_kernel)) if down_kernel else ''}]"
    elif group.algo == "loha":
        got = (s["w1a"][1], s["w1b"][1], *s["t1"][2:]) if "t1" in s else (s["w1a"][0], s["w1b"][1])
        if math.prod(got) != out * inner or got[0] != out:
            return f"LoHa makes {list(got)}"
    elif group.algo == "lokr":
        def dims(one: str, a: str, b: str, t: str | None = None) -> tuple[int, int, int]:
            if one in s:
                shape = s[one]
                return shape[0], shape[1], math.prod(shape[2:])
            if t and t in s:
                return s[a][1], s[b][1], math.prod(s[t][2:])
            return s[a][0], s[b][1], 1
        a1, b1, k1 = dims("k1", "k1a", "k1b")
        a2, b2, k2 = dims("k2", "k2a", "k2b", "kt2")
        if a1 * a2 != out or b1 * b2 * k1 * k2 != inner:
            return f"LoKr makes [{a1 * a2}, {b1 * b2 * k1 * k2}]"
    elif group.algo == "full":
        if math.prod(s["diff"]) != out * inner:
            return f"diff is {list(s['diff'])}"
    elif group.algo == "ia3" and math.prod(s["ia3"]) not in (out, weight[1]):
        return f"IA3 weight is {list(s['ia3'])}"
    if "dora" in s and math.prod(s["dora"]) not in (out, weight[1]):
        return f"dora_scale is {list(s['dora'])}"
    return None


def match(parsed: Parsed, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str],
          sig: ModelSignature) -> Match:
    """Resolve every group of ``parsed`` against ``sig`` (see module docstring)."""
    result = Match()
    orders: dict[str, list[str]] = {}
    for group in parsed.groups:
        target: tuple[str, str] | None = None
        if parsed.layout == "cloneofsimo":
            key = {UNET: "unet", TE: "text_encoder", TE2: "text_encoder_2"}[group.component]
            order = orders.setdefault(key, sig.clone_order(group.component, clone_classes(metadata, key)))
            index = int(group.written.split(":")[1])
            target = (group.component, order[index]) if index < len(order) else None
        elif group.path is not None:
            target = (group.component, group.path)
        else:
            target = sig.kohya.get(group.written)
            if target is not None and target[0] != group.component:
                target = None
        info = sig.modules.get(target) if target is not None else None
        if info is None:
            result.unmatched.append(f"{group.written}: no such module in this model")
            continue
        problem = _fits(group, shapes, info.shape)
        if problem is not None:
            result.unmatched.append(f"{group.written}: {problem}, the module's weight is {list(info.shape)}")
            continue
        result.targets.append((group, target))
        result.keys_matched += len(group.keys)
    return result
