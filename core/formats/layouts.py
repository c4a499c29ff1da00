"""Recognising the dict layouts of embedding files (spec section 1), whatever container held them.

A container reader (pickle, safetensors, image card) opens the file and hands the resulting dict here;
this module decides which layout it is, validates it, and returns :class:`EmbeddingData` with ``[N, D]``
float32 CPU tensors. Everything that is not exactly one of the known layouts is rejected with an
:class:`EmbeddingError` naming what was found (keys, types, shapes) and what was expected. The trigger
rules of spec section 4 live here too (:func:`decide_trigger`), so the library and the converter agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from sdrepl.core.embedding import CLIP_G, CLIP_L, MAX_VECTORS, SINGLE, EmbeddingData
from sdrepl.core.errors import EmbeddingError
from sdrepl.core.formats.common import GENERIC_STEM, describe_keys, describe_value
from sdrepl.core.names import name_problem

EXPECTED = (
    "expected one of: A1111 {string_to_param: {'*': [N, D]}, ...}, diffusers {'<token>': [N, D] or [D]}, "
    "{emb_params: [N, D]}, or an SDXL pair {clip_l: [N, 768], clip_g: [N, 1280]}"
)
#: Beyond this many tensors a file is a model or LoRA, and the message says so.
_MANY_TENSORS = 8


def as_vectors(value: object, path: Path, where: str) -> torch.Tensor:
    """Validate one vector set and return it as a fresh ``[N, D]`` float32 CPU tensor (1-D becomes [1, D])."""
    if not isinstance(value, torch.Tensor):
        raise EmbeddingError(path, f"{where} holds {describe_value(value)}; expected a tensor [N, D]")
    original = value
    if value.layout != torch.strided or value.device.type == "meta":
        raise EmbeddingError(
            path, f"{where} is a {value.layout}/{value.device.type} {describe_value(value)}; expected a dense tensor"
        )
    if not value.is_floating_point():
        raise EmbeddingError(path, f"{where} is a {describe_value(value)}; expected floating-point vectors")
    if value.ndim == 1:
        value = value.unsqueeze(0)
    elif value.ndim != 2:
        raise EmbeddingError(
            path, f"{where} is a {describe_value(value)} ({value.ndim} dimensions); expected [N, D] or [D]"
        )
    count, width = (int(s) for s in value.shape)
    if count == 0 or width == 0:
        raise EmbeddingError(
            path, f"{where} is a {describe_value(value)}: 0 vectors; expected at least one vector of width > 0"
        )
    if count > MAX_VECTORS:
        raise EmbeddingError(
            path,
            f"{where} has {count} vectors; a prompt chunk holds {MAX_VECTORS} tokens, so an embedding of more "
            f"than {MAX_VECTORS} vectors can never be used",
        )
    tensor = value.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
    finite = np.isfinite(tensor.numpy())  # numpy: a few µs per call where torch takes tens
    if not finite.all():
        bad = int((~finite).sum())
        raise EmbeddingError(
            path,
            f"{where} ({describe_value(original)}) contains {bad} NaN or infinite values; the training diverged or the file is "
            "damaged: use an earlier step or retrain",
        )
    return tensor


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def strip_token(token: str) -> str:
    """``'<birb-style>'`` -> ``'birb-style'`` (diffusers tokens are usually wrapped in angle brackets)."""
    token = token.strip()
    if len(token) >= 2 and token.startswith("<") and token.endswith(">"):
        token = token[1:-1].strip()
    return token


def _info(source: Mapping, metadata: Mapping[str, str] | None) -> dict[str, object]:
    """The informational fields (name, step, checkpoint, init text) from the dict and/or a safetensors header."""
    meta = dict(metadata or {})
    merged = {**meta, **{k: v for k, v in source.items() if isinstance(k, str) and not isinstance(v, torch.Tensor)}}
    return {
        "inner_name": _text(merged.get("name")),
        "step": _int(merged.get("step")),
        "checkpoint_hash": _text(merged.get("sd_checkpoint")),
        "checkpoint_name": _text(merged.get("sd_checkpoint_name")),
        "init_text": _text(merged.get("init_text")),
    }


def _data(vectors: dict, fmt: str, info: dict, name_from_inner: bool) -> EmbeddingData:
    """EmbeddingData whose trigger comes from the inner name when the container says so and there is a
    usable one (:func:`usable_inner_name`)."""
    return EmbeddingData(vectors, fmt, name_from_file=name_from_inner and usable_inner_name(info["inner_name"]),
                         **info)


def usable_inner_name(name: str | None) -> bool:
    """Whether a name found inside a file may be the trigger: the rule of :mod:`sdrepl.core.names`, the same
    as for names the user types. A name that breaks it (``../../x``, ``x\x1b]2;..``) is not used: the file
    answers to its file name instead (sanitised by falling back, so the file stays usable)."""
    return bool(name) and name_problem(name) is None


def _reject_extra_tensors(obj: Mapping, allowed: set[str], path: Path, layout: str) -> None:
    extra = {k: v for k, v in obj.items() if k not in allowed and isinstance(v, torch.Tensor)}
    if extra:
        raise EmbeddingError(
            path,
            f"{layout} file has extra tensors besides {sorted(allowed)}: {describe_keys(extra)}; " + EXPECTED,
        )


def recognise(
    obj: object,
    path: Path,
    container: str,
    *,
    metadata: Mapping[str, str] | None = None,
    name_from_inner: bool = False,
) -> EmbeddingData:
    """Turn an opened file's top-level object into :class:`EmbeddingData`, or raise EmbeddingError.

    ``container`` names where the dict came from (``pt``, ``safetensors``, ``png-text``...) and prefixes
    the ``format``; ``metadata`` is a safetensors header's string metadata; ``name_from_inner`` makes the
    inner name the trigger (image cards).
    """
    if not isinstance(obj, Mapping):
        raise EmbeddingError(path, f"the file holds {describe_value(obj)}; " + EXPECTED)
    bad_keys = [k for k in obj if not isinstance(k, str)]
    if bad_keys:
        raise EmbeddingError(path, f"the dict has non-string keys ({describe_value(bad_keys[0])}); " + EXPECTED)
    if "string_to_param" in obj:
        return _a1111(obj, path, container, metadata, name_from_inner)
    if CLIP_L in obj or CLIP_G in obj:
        return _sdxl_pair(obj, path, container, metadata, name_from_inner)
    if any(k.startswith("bundle_emb.") for k in obj):
        raise EmbeddingError(
            path,
            "this is a LoRA with bundled embeddings (bundle_emb.* keys); put it in a LoRA folder (--loras, "
            "default ./loras): its embeddings are usable from there while the file is in it",
        )
    if "emb_params" in obj:
        _reject_extra_tensors(obj, {"emb_params"}, path, "An emb_params")
        info = _info(obj, metadata)
        vectors = as_vectors(obj["emb_params"], path, "emb_params")
        return _data({SINGLE: vectors}, f"{container}/emb_params", info, name_from_inner)
    return _diffusers(obj, path, container, metadata, name_from_inner)


def _a1111(obj: Mapping, path: Path, container: str, metadata, name_from_inner: bool) -> EmbeddingData:
    terms = obj["string_to_param"]
    if not isinstance(terms, Mapping):
        raise EmbeddingError(
            path, f"string_to_param holds {describe_value(terms)}; expected a dict with one term such as {{'*': [N, D]}}"
        )
    if len(terms) != 1:
        raise EmbeddingError(
            path,
            f"string_to_param holds {len(terms)} terms ({describe_keys(terms)}); expected exactly one "
            "(usually '*'): files with several terms are not supported by A1111 either",
        )
    _reject_extra_tensors(obj, {"string_to_param"}, path, "An A1111")
    (term, value), = terms.items()
    vectors = as_vectors(value, path, f"string_to_param[{term!r}]")
    return _data({SINGLE: vectors}, f"{container}/a1111", _info(obj, metadata), name_from_inner)


def _sdxl_pair(obj: Mapping, path: Path, container: str, metadata, name_from_inner: bool) -> EmbeddingData:
    missing = [k for k in (CLIP_L, CLIP_G) if k not in obj]
    if missing:
        raise EmbeddingError(
            path,
            f"has {describe_keys({k: obj[k] for k in (CLIP_L, CLIP_G) if k in obj})} but no {missing[0]!r}; an "
            "SDXL embedding needs both clip_l [N, 768] and clip_g [N, 1280]",
        )
    _reject_extra_tensors(obj, {CLIP_L, CLIP_G}, path, "An SDXL")
    pair = {key: as_vectors(obj[key], path, key) for key in (CLIP_L, CLIP_G)}
    if pair[CLIP_L].shape[0] != pair[CLIP_G].shape[0]:
        raise EmbeddingError(
            path,
            f"clip_l has {pair[CLIP_L].shape[0]} vectors but clip_g has {pair[CLIP_G].shape[0]}; the two halves "
            "of an SDXL embedding must have the same number of vectors",
        )
    return _data(pair, f"{container}/sdxl", _info(obj, metadata), name_from_inner)


def _diffusers(obj: Mapping, path: Path, container: str, metadata, name_from_inner: bool) -> EmbeddingData:
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not obj:
        raise EmbeddingError(path, "the file holds an empty dict; " + EXPECTED)
    if len(tensors) > 1:
        hint = " (this looks like a model or LoRA, not an embedding)" if len(tensors) > _MANY_TENSORS else ""
        raise EmbeddingError(
            path,
            f"a diffusers-style dict must hold exactly one token, but it holds {len(tensors)} tensors"
            f"{hint}: {describe_keys(tensors)}",
        )
    if len(obj) != 1:
        raise EmbeddingError(path, f"unrecognised keys: {describe_keys(obj)}; " + EXPECTED)
    (token, value), = obj.items()
    vectors = as_vectors(value, path, f"token {token!r}")
    info = _info({}, metadata)
    inner = strip_token(token) or None
    generic = bool(GENERIC_STEM.match(path.stem))
    info["inner_name"] = inner
    return EmbeddingData(
        {SINGLE: vectors}, f"{container}/diffusers", name_from_file=usable_inner_name(inner) and (generic or name_from_inner),
        **info,
    )


def decide_trigger(path: Path, data: EmbeddingData) -> str:
    """The trigger of a file (spec section 4): the stem, unless the file itself names the embedding.

    Image cards use their inner name; generic ``learned_embeds[-steps-K]`` stems use the token inside
    (without ``<>``) or, failing that, the parent folder's name. An inner name that is not a valid name
    (:func:`usable_inner_name`) counts as absent. Renaming a file renames its trigger.
    """
    if data.name_from_file and data.inner_name:
        return data.inner_name
    stem = path.stem
    if GENERIC_STEM.match(stem) and path.parent.name:
        return path.parent.name
    return stem


def ignored_inner_name(path: Path, data: EmbeddingData) -> str | None:
    """A warning when the file's inner name would be its trigger but is not a valid name, else None."""
    inner = data.inner_name
    if not inner or usable_inner_name(inner):
        return None
    card = data.format.split("/")[0].endswith(("-text", "-pixels"))
    if not (card or (GENERIC_STEM.match(path.stem) and data.format.endswith("/diffusers"))):
        return None
    from sdrepl.core.display import visible

    return (f"{path}: the name inside the file ({visible(repr(inner))}) is not a usable name "
            f"({name_problem(inner)}); it answers to <{visible(decide_trigger(path, data))}> instead")
