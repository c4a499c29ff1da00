"""Loading original-layout (LDM / AUTOMATIC1111) single-file checkpoints, offline.

A ``.safetensors`` / ``.ckpt`` checkpoint holds the weights of the whole pipeline under the original
Stable Diffusion names (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*`` or
``conditioner.embedders.*``) but no architecture. The family is read from the keys (which text encoder),
the size from the shapes (``conv_in`` channels, text width), and the matching diffusers config folder is
chosen: the cached ``tiny`` folder for the tiny models, else the standard SD 1.x / 2.x / SDXL configs
written from :mod:`sdrepl.core.checkpoint_configs`. diffusers' per-component single-file converters then
map the weights; nothing is fetched from the hub.

Pickled checkpoints are read only with ``torch.load(weights_only=True)``; the few harmless globals that
real SD ``.ckpt`` files carry (a Lightning callback record, numpy scalars for ``global_step``) are allowed
as inert stand-ins, anything else is refused. Every failure is one :class:`ModelError` line naming the
file, what was found and what was expected.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdrepl.core import tiny
from sdrepl.core.errors import ModelError

UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT_L = "conditioner.embedders.0.transformer."
SDXL_TEXT_G = "conditioner.embedders.1.model."
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
LABEL = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
#: Text width of the standard releases of each family (UNet conv_in has 320 channels in all of them).
STANDARD_WIDTH = {"sd1": 768, "sd2": 1024, "sdxl": 1280}
STANDARD_CHANNELS = 320


@dataclass(frozen=True)
class CheckpointInfo:
    """What the keys and shapes of a checkpoint say about its architecture."""

    family: str  # sd1, sd2, sdxl
    channels: int  # UNet conv_in output channels
    width: int  # text encoder width (the second encoder's for SDXL)
    tiny: str | None  # the tiny model it has the shape of, if any
    prediction_type: str | None  # a hint stored in the file (ckpt global_step, modelspec metadata)


def load_single_file(
    path: Path,
    config: Path | None = None,
    dtype: torch.dtype | None = None,
    prediction_type: str | None = None,
):
    """A StableDiffusion(XL)Pipeline from the single-file checkpoint at ``path``, without network.

    ``config`` is a diffusers folder whose component configs describe the checkpoint (for architectures
    sdrepl does not know); ``prediction_type`` (``epsilon`` / ``v_prediction``) overrides the guess for
    SD 2.x files, whose 512 and 768 releases differ only in it.
    """
    path = Path(path)
    state, hint = read_state_dict(path)
    info = inspect_state_dict(state, path, hint, check_size=config is None)
    if config is not None:
        folder = Path(config).expanduser()
        if not (folder / "unet" / "config.json").is_file():
            raise ModelError(f"config {folder}: not a diffusers config folder (no unet/config.json); expected a "
                             "folder like a saved diffusers model (model_index.json, unet/, vae/, text_encoder/ ...)")
    elif info.tiny is not None:
        folder = tiny.ensure_tiny_folder(info.tiny)
    else:
        from sdrepl.core.checkpoint_configs import ensure_config_folder

        folder = ensure_config_folder(info.family)
    return build_pipeline(state, info, folder, path, dtype, prediction_type or info.prediction_type)


# -- reading ---------------------------------------------------------------------------------------------


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of a checkpoint file and its prediction-type hint, or a ModelError saying what is wrong."""
    if not path.is_file():
        raise ModelError(f"{path}: no such file; expected a .safetensors or .ckpt checkpoint")
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"{path}: the file is empty (0 bytes); expected a .safetensors or .ckpt checkpoint")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state, hint = _read_safetensors(path, size)
    elif suffix in PICKLE_SUFFIXES:
        state, hint = _read_pickle(path)
    else:
        raise ModelError(f"{path}: unknown checkpoint type {suffix or '(no suffix)'!r}; expected .safetensors or .ckpt")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError(f"{path}: not a Stable Diffusion checkpoint: {_guess_kind([str(k) for k in state])}; "
                         "expected the tensors of a whole model")
    return tensors, hint


def _read_safetensors(path: Path, size: int) -> tuple[Mapping[str, Any], str | None]:
    """Check the header against the file size first, so truncation is reported as such."""
    from safetensors.torch import load_file

    with open(path, "rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length <= 1 or length > min(size - 8, 100_000_000):
            raise ModelError(f"{path}: not a safetensors file (the header length in its first 8 bytes does not fit "
                             f"a {size:,}-byte file); it is corrupt or not a checkpoint, expected a .safetensors model")
        try:
            header = json.loads(fh.read(length))
        except ValueError as exc:
            raise ModelError(f"{path}: corrupt safetensors header ({_short(exc, 80)}); expected valid JSON") from exc
    if not isinstance(header, dict):
        raise ModelError(f"{path}: corrupt safetensors header (not a JSON object)")
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise ModelError(f"{path}: corrupt safetensors header (a tensor entry without valid data_offsets)") from exc
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        raise ModelError(f"{path}: truncated: the header describes {needed:,} bytes but the file has {size:,}; "
                         "download or copy it again")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"{path}: cannot read this safetensors file ({_short(exc)}); it is corrupt") from exc
    meta = header.get("__metadata__") or {}
    pred = str(meta.get("modelspec.prediction_type", "")).lower() if isinstance(meta, dict) else ""
    hint = {"v": "v_prediction", "v_prediction": "v_prediction", "epsilon": "epsilon"}.get(pred)
    return state, hint


class _Inert:
    """Stand-in for a harmless class in a pickled checkpoint: built without running any of its code."""

    def __setstate__(self, state: object) -> None:
        pass


def _harmless_globals() -> list[Any]:
    """Globals found in real SD ``.ckpt`` files that carry no weights: a Lightning callback's record and
    numpy scalars (``global_step``). Mapped to inert objects or plain numpy values for the restricted loader."""
    allowed: list[Any] = [(_Inert, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]
    try:
        import numpy as np
    except ImportError:
        return allowed
    core = getattr(np, "_core", None) or np.core
    allowed += [(core.multiarray.scalar, f"{m}.multiarray.scalar") for m in ("numpy.core", "numpy._core")]
    allowed.append((np.dtype, "numpy.dtype"))
    allowed += [getattr(np.dtypes, n) for n in ("Int64DType", "Int32DType", "Float64DType", "Float32DType")
                if hasattr(np, "dtypes") and hasattr(np.dtypes, n)]
    return allowed


def _torch_load(path: Path, mmap: bool) -> Any:
    safe = getattr(torch.serialization, "safe_globals", None)
    if safe is None:  # torch < 2.5: the plain restricted loader
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    with safe(_harmless_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _read_pickle(path: Path) -> tuple[Mapping[str, Any], str | None]:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # torch.save's zip, or a legacy pickle
        raise ModelError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle); it is "
                         "corrupt or of another kind, expected a .ckpt saved by torch.save")
    try:
        try:
            obj = _torch_load(path, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = _torch_load(path, mmap=False)  # the legacy (pre-zip) format cannot be memory-mapped
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "unrecognized function" in text:
            culprit = text.split("Unsupported global:", 1)[1].split()[1] if "Unsupported global:" in text else "?"
            raise ModelError(f"{path}: refused: the pickle holds Python objects beyond tensors ({culprit}); sdrepl "
                             "reads .ckpt files only with torch.load(weights_only=True). Convert it to .safetensors "
                             "with a tool you trust, or use a .safetensors release") from exc
        raise ModelError(f"{path}: not a PyTorch checkpoint ({_short(exc, 80)}); it is corrupt or truncated, "
                         "expected a .ckpt saved by torch.save") from exc
    except Exception as exc:  # zip errors, EOF, ...
        raise ModelError(f"{path}: cannot read this .ckpt ({_short(exc, 120)}); it is corrupt or truncated, "
                         "expected a .ckpt saved by torch.save") from exc
    if not isinstance(obj, Mapping):
        raise ModelError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors; expected a checkpoint")
    step = obj.get("global_step")
    hint = "epsilon" if isinstance(step, int) and step == 875000 else None  # SD 2.0 512-base (as diffusers)
    while isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    return obj, hint


# -- recognising ------------------------------------------------------------------------------------------


def inspect_state_dict(
    state: dict[str, torch.Tensor], path: Path, hint: str | None = None, check_size: bool = True
) -> CheckpointInfo:
    """Family and size from the keys and shapes; ModelError for anything that is not a full SD checkpoint.

    Old SD 1.x files name the CLIP weights without the ``text_model.`` level; they are renamed in place.
    """
    keys = list(state)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if not has(UNET):
        raise ModelError(f"{path}: not a Stable Diffusion checkpoint: {_guess_kind(keys)}; expected the weights "
                         f"of a whole model ({UNET}*, {VAE}*, cond_stage_model.*)")
    if has(SDXL_TEXT_G):
        family, width_key = "sdxl", SDXL_TEXT_G + "positional_embedding"
    elif has("conditioner.embedders.0.model."):
        raise ModelError(f"{path}: an SDXL refiner checkpoint (one OpenCLIP encoder); expected a base model "
                         "(SD 1.x, SD 2.x or SDXL base)")
    elif has(SD2_TEXT):
        family, width_key = "sd2", SD2_TEXT + "token_embedding.weight"
    elif has(SD1_TEXT):
        for key in [k for k in keys if k.startswith(SD1_TEXT) and not k.startswith(SD1_TEXT + "text_model.")]:
            state[SD1_TEXT + "text_model." + key[len(SD1_TEXT):]] = state.pop(key)
        family, width_key = "sd1", SD1_TEXT + "text_model.embeddings.token_embedding.weight"
    else:
        raise ModelError(f"{path}: has UNet weights but no text encoder (no cond_stage_model.* or "
                         "conditioner.embedders.* keys); expected a full checkpoint, not a UNet-only file")
    if not has(VAE):
        raise ModelError(f"{path}: an {LABEL[family]} checkpoint without VAE weights ({VAE}*); expected a full "
                         "checkpoint with its VAE baked in")
    for key in (CONV_IN, width_key):
        if key not in state:
            raise ModelError(f"{path}: an {LABEL[family]} checkpoint missing {key!r}; it is incomplete or damaged")
    conv_in = state[CONV_IN]
    width = int(state[width_key].shape[-1])
    if conv_in.ndim != 4:
        raise ModelError(f"{path}: {CONV_IN!r} has shape {tuple(conv_in.shape)}; expected a 4-d convolution weight "
                         "(the file is damaged)")
    if conv_in.shape[1] != 4:
        raise ModelError(f"{path}: the UNet takes {conv_in.shape[1]} input channels (an inpainting or "
                         "instruct-pix2pix model?); expected 4 (a text-to-image model)")
    channels = int(conv_in.shape[0])
    tiny_name = next((s.name for s in tiny.TINY_MODELS.values() if s.family == family and s.width == width
                      and channels == tiny.UNET_CHANNELS[0]), None)
    if check_size and tiny_name is None and (channels, width) != (STANDARD_CHANNELS, STANDARD_WIDTH[family]):
        raise ModelError(f"{path}: an {LABEL[family]}-style checkpoint of unknown size (UNet conv_in {channels} "
                         f"channels, text width {width}); expected {STANDARD_CHANNELS} and "
                         f"{STANDARD_WIDTH[family]} (or a tiny model), or pass a config folder that describes it")
    return CheckpointInfo(family, channels, width, tiny_name, hint)


def _guess_kind(keys: list[str]) -> str:
    """A short description of what a non-checkpoint file looks like, for the error message."""
    if not keys:
        return "it is an empty dict"
    joined = " ".join(keys[:200])
    if any(k in keys for k in ("string_to_param", "emb_params", "clip_l", "clip_g")) or (
        len(keys) <= 2 and all(not k.count(".") for k in keys)
    ):
        return "it looks like a textual-inversion embedding (put it in the embeddings folder)"
    if "lora_" in joined or ".lora_A." in joined or ".lora_down." in joined:
        return "it looks like a LoRA"
    if any(k.startswith(("down_blocks.", "mid_block.", "conv_in.", "text_model.", "encoder.down_blocks.")) for k in keys):
        return "it looks like one diffusers component's weights (give the model folder with model_index.json)"
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        return "it looks like a standalone VAE"
    sample = ", ".join(repr(k[:60]) for k in keys[:3])
    return f"found {len(keys)} entries such as {sample}"


# -- building ---------------------------------------------------------------------------------------------


def build_pipeline(
    state: dict[str, torch.Tensor],
    info: CheckpointInfo,
    folder: Path,
    path: Path,
    dtype: torch.dtype | None = None,
    prediction_type: str | None = None,
):
    """Convert each component with diffusers' single-file converters against the configs in ``folder``."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    # Loaded in the stored dtype and cast here, after the completeness check: diffusers' own cast would fail
    # on missing (meta) weights with a message about meta tensors, and warns on every cast besides.
    common = {"config": str(folder), "local_files_only": True}
    where = f"{path}: an {LABEL[info.family]} checkpoint"
    unet_overrides: dict[str, Any] = {}
    if info.family == "sd2" and info.tiny is None and prediction_type == "epsilon":
        unet_overrides["sample_size"] = 64  # the 512-pixel SD 2.x base model

    def part(label: str, load: Callable[[], Any]) -> Any:
        try:
            module = load()
        except Exception as exc:  # diffusers/transformers raise many types for weights that do not fit
            if "meta tensor" in str(exc):  # diffusers moved a module some weights never reached
                raise ModelError(f"{where} lacks some {label} weights; it is incomplete or of another "
                                 "architecture") from exc
            raise ModelError(f"{where} whose {label} weights do not fit the configs in {folder} ({_short(exc)})") from exc
        missing = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.device.type == "meta"]
        if missing:
            raise ModelError(f"{where} lacks {len(missing)} {label} weights (e.g. {missing[0]!r}); "
                             "it is incomplete or of another architecture")
        if dtype is not None:
            torch.nn.Module.to(module, dtype=dtype)
        return module

    unet = part("UNet", lambda: UNet2DConditionModel.from_single_file(state, subfolder="unet", **common,
                                                                      **unet_overrides))
    vae = part("VAE", lambda: AutoencoderKL.from_single_file(state, subfolder="vae", **common))
    text_encoder = part("text encoder", lambda: create_diffusers_clip_model_from_ldm(
        CLIPTextModel, state, subfolder="text_encoder", **common))
    try:
        index = json.loads((folder / "model_index.json").read_text())
        scheduler_cls = getattr(diffusers, index.get("scheduler", [None, "PNDMScheduler"])[1])
        scheduler = scheduler_cls.from_pretrained(folder, subfolder="scheduler")
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    except Exception as exc:
        raise ModelError(f"config folder {folder}: cannot read its scheduler or tokenizer ({_short(exc)})") from exc
    if prediction_type:
        scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)
    if info.family == "sdxl":
        text_encoder_2 = part("second text encoder", lambda: create_diffusers_clip_model_from_ldm(
            CLIPTextModelWithProjection, state, subfolder="text_encoder_2", **common))
        tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
        return diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                                   tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                                   scheduler=scheduler, add_watermarker=False)
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def _short(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception, cut to ``limit`` characters: enough to act on, never a dump."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
