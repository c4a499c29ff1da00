"""LoRA key layouts (spec section 2) -> one canonical per-module form, from key names and shapes alone.

Each layout family has one parser here; each returns a :class:`Parsed`: the file's keys grouped per
target module (:class:`Group`: which algorithm, which key plays which role, rank, where alpha is), the
bundled embeddings, and the keys nothing understood. Matching the groups to a model
(:mod:`.matching`) and computing deltas from tensors (:mod:`.deltas`) are separate steps, so a file is
indexed without reading a single tensor.

Families: ``kohya`` (``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` with the LoRA, LoCon,
DoRA keys) and, under the same prefixes, the LyCORIS algorithms ``loha``, ``lokr``, ``full``, ``ia3``
(``layout`` is ``lycoris`` when any group uses one); ``diffusers-attnproc``; ``diffusers``; ``peft``;
``cloneofsimo``. Unsupported LyCORIS algorithms (OFT, BOFT, GLoRA) are refused by name, never mis-applied.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

from sdrepl.core.networks.modules import TE, TE2, UNET

#: kohya / LyCORIS key suffix -> role.
_ROLES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
    "dora_scale": "dora", "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b",
    "hada_t1": "t1", "hada_t2": "t2", "lokr_w1": "k1", "lokr_w1_a": "k1a", "lokr_w1_b": "k1b", "lokr_w2": "k2",
    "lokr_w2_a": "k2a", "lokr_w2_b": "k2b", "lokr_t2": "kt2", "diff": "diff", "diff_b": "diff_b",
    "weight": "ia3", "on_input": "on_input",
}
#: Suffixes of LyCORIS algorithms sdrepl does not apply: refused with their name.
_REFUSED = {"oft_blocks": "OFT", "oft_diag": "OFT", "boft_blocks": "BOFT", "boft_m": "BOFT",
            "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
            "rescale": "OFT"}
_KOHYA_PREFIX = re.compile(r"^(lora_unet_|lora_te1_|lora_te2_|lora_te_)")
_KOHYA_COMPONENT = {"lora_unet_": UNET, "lora_te_": TE, "lora_te1_": TE, "lora_te2_": TE2}


@dataclass
class Group:
    """One target module as a file writes it: which algorithm and which tensor key plays which role."""

    written: str  # the module name as the file spells it (kohya prefix, diffusers path, ``unet:3``)
    component: str
    algo: str = "lora"  # lora | loha | lokr | full | ia3
    keys: dict[str, str] = field(default_factory=dict)  # role -> tensor key
    rank: int | None = None
    #: A fixed alpha (PEFT config); ``keys["alpha"]`` holds a per-module alpha tensor instead.
    alpha: float | None = None
    #: Multiplies ``alpha / rank`` (PEFT's rsLoRA) or replaces it (cloneofsimo: 1).
    fixed_scale: float | None = None
    #: Canonical module path for layouts that name it directly (None: resolve ``written`` by alias).
    path: str | None = None


@dataclass
class Parsed:
    layout: str
    groups: list[Group] = field(default_factory=list)
    #: Bundled embedding name -> {encoder key ("text_encoder" / "clip_l" / "clip_g"): tensor key}.
    embeddings: dict[str, dict[str, str]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    #: Why the file cannot be used at all (an incomplete group, a refused algorithm), or None.
    problem: str | None = None

    @property
    def rank(self) -> int | None:
        ranks = Counter(g.rank for g in self.groups if g.rank)
        return ranks.most_common(1)[0][0] if ranks else None

    @property
    def algos(self) -> list[str]:
        return sorted({g.algo for g in self.groups})


def _bundle(keys: list[str], parsed: Parsed) -> list[str]:
    """Take ``bundle_emb.<name>.string_to_param.*`` / ``.clip_l`` / ``.clip_g`` keys; return the rest."""
    rest = []
    for key in keys:
        if not key.startswith("bundle_emb."):
            rest.append(key)
            continue
        name, _, tail = key[len("bundle_emb."):].partition(".")
        if tail.startswith("string_to_param."):
            parsed.embeddings.setdefault(name, {})["text_encoder"] = key
        elif tail in ("clip_l", "clip_g"):
            parsed.embeddings.setdefault(name, {})[tail] = key
        else:
            parsed.unknown.append(key)
    return rest


def _kohya(keys: list[str], shapes: dict[str, tuple[int, ...]]) -> Parsed:
    parsed = Parsed("kohya")
    groups: dict[str, Group] = {}
    refused: set[str] = set()
    for key in _bundle(keys, parsed):
        match = _KOHYA_PREFIX.match(key)
        module, dot, suffix = key.partition(".")
        if match is None or not dot:
            parsed.unknown.append(key)
            continue
        if suffix in _REFUSED:
            refused.add(_REFUSED[suffix])
            continue
        role = _ROLES.get(suffix)
        if role is None:
            parsed.unknown.append(key)
            continue
        group = groups.setdefault(module, Group(module, _KOHYA_COMPONENT[match.group(1)]))
        group.keys[role] = key
    if refused:
        parsed.problem = (f"uses the LyCORIS algorithm {', '.join(sorted(refused))}, which sdrepl does not apply "
                          "(supported: LoRA, LoCon, LoHa, LoKr, DoRA, full, IA3)")
        return parsed
    for group in groups.values():
        problem = _classify(group, shapes)
        if problem is not None:
            parsed.problem = f"{group.written}: {problem}"
            return parsed
        parsed.groups.append(group)
    if any(g.algo != "lora" for g in parsed.groups):
        parsed.layout = "lycoris"
    return parsed


def _classify(group: Group, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Decide the group's algorithm and rank from its roles; the reason when the roles do not add up."""
    roles = set(group.keys) - {"alpha", "dora"}
    shape = {role: shapes[key] for role, key in group.keys.items()}
    if roles & {"down", "up", "mid"}:
        if not {"down", "up"} <= roles or roles - {"down", "up", "mid"}:
            return f"a LoRA needs lora_down and lora_up, found {sorted(roles)}"
        group.algo, group.rank = "lora", shape["down"][0]
        if len(shape["up"]) < 2 or shape["up"][1] != shape["down"][0]:
            return (f"rank mismatch: lora_down {list(shape['down'])} has rank {shape['down'][0]} but lora_up "
                    f"{list(shape['up'])} expects {shape['up'][1] if len(shape['up']) > 1 else '?'}")
        if "mid" in roles and (len(shape["mid"]) != 4 or shape["mid"][:2] != (group.rank, group.rank)):
            return f"lora_mid {list(shape['mid'])} does not fit rank {group.rank}"
    elif roles & {"w1a", "w1b", "w2a", "w2b", "t1", "t2"}:
        if not {"w1a", "w1b", "w2a", "w2b"} <= roles:
            return f"a LoHa needs hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, found {sorted(roles)}"
        group.algo, group.rank = "loha", shape["w1b"][0]
        if ("t1" in roles) != ("t2" in roles):
            return "a LoHa with CP decomposition needs both hada_t1 and hada_t2"
        if "t1" not in roles and (shape["w1a"][1] != shape["w1b"][0] or shape["w2a"][1] != shape["w2b"][0]):
            return (f"rank mismatch: hada_w1_a {list(shape['w1a'])} x hada_w1_b {list(shape['w1b'])}, "
                    f"hada_w2_a {list(shape['w2a'])} x hada_w2_b {list(shape['w2b'])}")
    elif roles & {"k1", "k1a", "k1b", "k2", "k2a", "k2b", "kt2"}:
        has1 = "k1" in roles or {"k1a", "k1b"} <= roles
        has2 = "k2" in roles or {"k2a", "k2b"} <= roles
        if not (has1 and has2):
            return f"a LoKr needs lokr_w1 (or _a/_b) and lokr_w2 (or _a/_b), found {sorted(roles)}"
        group.algo = "lokr"
        group.rank = shape["k1b"][0] if "k1b" in roles else shape["k2b"][0] if "k2b" in roles else None
        for a, b in (("k1a", "k1b"), ("k2a", "k2b")):
            if a in roles and "kt2" not in roles and shape[a][-1] != shape[b][0]:
                return f"rank mismatch: {group.keys[a]} {list(shape[a])} x {group.keys[b]} {list(shape[b])}"
    elif "diff" in roles:
        if roles - {"diff", "diff_b"}:
            return f"a full (diff) module has unexpected keys {sorted(roles)}"
        group.algo = "full"
    elif "ia3" in roles:
        if roles != {"ia3", "on_input"}:
            return "an IA3 module needs weight and on_input"
        group.algo = "ia3"
    elif roles == set() and "alpha" in group.keys:
        return "has an alpha but no weights"
    else:
        return f"unknown keys {sorted(group.keys.values())[:3]}"
    return None


# --- diffusers / PEFT ---------------------------------------------------------------------------------

_ATTNPROC = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_TE_ATTNPROC = re.compile(r"^(.*\.self_attn)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_DIFFUSERS = re.compile(r"^(.*)\.(lora|lora_linear_layer)\.(down|up)\.weight$")
_PEFT = re.compile(r"^(.*)\.lora_(A|B)(?:\.[\w-]+)?\.weight$")
_PEFT_MAGNITUDE = re.compile(r"^(.*)\.lora_magnitude_vector(?:\.[\w-]+)?(?:\.weight)?$")
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_COMPONENT_PREFIX = (("text_encoder_2.", TE2), ("text_encoder.", TE), ("unet.", UNET))


def _split_component(key: str) -> tuple[str | None, str]:
    for prefix, component in _COMPONENT_PREFIX:
        if key.startswith(prefix):
            return component, key[len(prefix):]
    if key.startswith("base_model.model."):
        rest = key[len("base_model.model."):]
        return (TE if rest.startswith(("text_model.", "encoder.layers.")) else UNET), rest
    return None, key


def _diffusers(keys: list[str], shapes: dict[str, tuple[int, ...]], config: dict | None) -> Parsed:
    parsed = Parsed("diffusers")
    groups: dict[tuple[str, str], Group] = {}
    layouts: set[str] = set()
    for key in _bundle(keys, parsed):
        component, rest = _split_component(key)
        role = None
        if (m := _ATTNPROC.match(rest)):
            path = f"{m.group(1)}.{m.group(2)}" + (".0" if m.group(2) == "to_out" else "")
            role, kind = ("down" if m.group(3) == "down" else "up"), "diffusers-attnproc"
            component = component or UNET
        elif (m := _TE_ATTNPROC.match(rest)):
            path, role, kind = f"{m.group(1)}.{_TE_PROJ[m.group(2)]}", m.group(3), "diffusers-attnproc"
            component = component or TE
        elif (m := _DIFFUSERS.match(rest)):
            path, role, kind = m.group(1), m.group(3), "diffusers"
        elif (m := _PEFT.match(rest)):
            path, role, kind = m.group(1), ("down" if m.group(2) == "A" else "up"), "peft"
        elif (m := _PEFT_MAGNITUDE.match(rest)):
            path, role, kind = m.group(1), "dora", "peft"
        elif rest.endswith(".alpha"):
            path, role, kind = rest[: -len(".alpha")], "alpha", ""
        if role is None or component is None:
            parsed.unknown.append(key)
            continue
        if kind:
            layouts.add(kind)
        path = path.removeprefix("text_model.") if component != UNET else path
        group = groups.setdefault((component, path), Group(f"{component}.{path}", component, path=path))
        group.keys[role] = key
    parsed.layout = "peft" if "peft" in layouts else "diffusers-attnproc" if "diffusers-attnproc" in layouts else "diffusers"
    for group in groups.values():
        problem = _classify(group, shapes)
        if problem is not None:
            parsed.problem = f"{group.written}: {problem}"
            return parsed
        if config is not None and "alpha" not in group.keys:
            _peft_scale(group, config)
        parsed.groups.append(group)
    return parsed


def _peft_scale(group: Group, config: dict) -> None:
    """rank/alpha from a PEFT ``adapter_config.json`` (``r``, ``lora_alpha``, patterns, rsLoRA)."""
    name = group.path or ""
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if name == pattern or name.endswith("." + pattern):
            alpha = value
    if isinstance(alpha, (int, float)) and group.rank:
        group.alpha = float(alpha)
        if config.get("use_rslora"):
            group.fixed_scale = float(alpha) / group.rank**0.5


# --- cloneofsimo ---------------------------------------------------------------------------------------

_CLONE = re.compile(r"^(unet|text_encoder|text_encoder_2):(\d+):(up|down)$")
_CLONE_EMBED = re.compile(r"^<[^<>\s]{1,64}>$")


def _clone(keys: list[str], shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> Parsed:
    parsed = Parsed("cloneofsimo")
    groups: dict[str, Group] = {}
    comp = {"unet": UNET, "text_encoder": TE, "text_encoder_2": TE2}
    for key in keys:
        if (m := _CLONE.match(key)):
            written = f"{m.group(1)}:{m.group(2)}"
            group = groups.setdefault(written, Group(written, comp[m.group(1)], fixed_scale=1.0))
            group.keys[m.group(3)] = key
        elif _CLONE_EMBED.match(key) and len(shapes[key]) in (1, 2):
            parsed.embeddings[key[1:-1]] = {"text_encoder": key}
        else:
            parsed.unknown.append(key)
    for written in sorted(groups, key=lambda w: (w.split(":")[0], int(w.split(":")[1]))):
        group = groups[written]
        problem = _classify(group, shapes)
        if problem is not None:
            parsed.problem = f"{written}: {problem}"
            return parsed
        declared = metadata.get(f"{written}:rank")
        if declared is not None and declared.strip().isdigit() and int(declared) != group.rank:
            parsed.problem = f"{written}: metadata says rank {declared} but the tensors have rank {group.rank}"
            return parsed
        parsed.groups.append(group)
    return parsed


def clone_classes(metadata: dict[str, str], component_key: str) -> set[str]:
    """The ancestor classes a cloneofsimo file was trained on (its metadata), or that trainer's defaults."""
    default = {"unet": {"CrossAttention", "Attention", "GEGLU"}, "text_encoder": {"CLIPAttention"},
               "text_encoder_2": {"CLIPAttention"}}[component_key]
    try:
        value = json.loads(metadata.get(component_key, ""))
    except ValueError:
        return default
    return {str(v) for v in value} if isinstance(value, list) and value else default


# --- dispatch ------------------------------------------------------------------------------------------


def parse_keys(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], config: dict | None = None) -> Parsed:
    """Recognise the layout of a file with these tensor shapes; see the module docstring."""
    keys = list(shapes)
    if not keys:
        return Parsed("empty", problem="holds no tensors")
    votes = Counter()
    for key in keys:
        if _KOHYA_PREFIX.match(key):
            votes["kohya"] += 1
        elif _CLONE.match(key):
            votes["cloneofsimo"] += 1
        elif key.startswith("bundle_emb.") or _CLONE_EMBED.match(key):
            continue
        elif _split_component(key)[0] is not None or ".processor." in key or ".lora" in key:
            votes["diffusers"] += 1
    if not votes:
        sample = ", ".join(repr(k) for k in keys[:3])
        return Parsed("unknown", unknown=keys, problem=f"no LoRA layout recognised in its {len(keys)} keys "
                      f"(e.g. {sample}); expected kohya lora_unet_*/lora_te_*, LyCORIS, diffusers, PEFT or "
                      "cloneofsimo keys")
    family = votes.most_common(1)[0][0]
    if family == "kohya":
        return _kohya(keys, shapes)
    if family == "cloneofsimo":
        return _clone(keys, shapes, metadata)
    return _diffusers(keys, shapes, config)
