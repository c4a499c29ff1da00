"""Writing embeddings in the formats other tools load (spec section 5), always atomically.

- ``safetensors`` (the default): ``emb_params [N, D]`` for single-encoder models, ``clip_l`` / ``clip_g``
  for SDXL pairs, plus string metadata in the header (name, step, model hash, init text, vectors,
  sdrepl version). Loads in A1111, ComfyUI, kohya and diffusers.
- ``pt``: A1111's pickle layout exactly (``string_to_token {'*': 265}``, ``string_to_param {'*': [N, D]}``,
  ``name``, ``step``, ``sd_checkpoint``, ``sd_checkpoint_name``); an SDXL pair as ``{clip_l, clip_g}`` and
  nothing else (what A1111 and ComfyUI read from a ``.pt``).
- ``diffusers``: ``{"<name>": [N, D]}``, as ``torch.save`` for ``.bin`` or safetensors for ``.safetensors``,
  which diffusers' ``load_textual_inversion`` accepts.
- image cards (:func:`write_png_card`): A1111's PNG with the ``sd-ti-embedding`` text chunk *and* the pixel
  data cube (lossless WEBP carries the data cube only: WEBP has no text chunks).

Every write goes through :mod:`sdrepl.core.atomic`, so the folder watcher never sees half a file, and an
existing file is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from sdrepl import __version__
from sdrepl.core.atomic import atomic_write_bytes, atomic_writer, write_error_text
from sdrepl.core.embedding import CLIP_G, CLIP_L, MAX_VECTORS, SINGLE
from sdrepl.core.errors import EmbeddingError
from sdrepl.core.formats.common import describe_value
from sdrepl.core.formats.image_card import build_card_image, default_preview, encode_text_chunk
from sdrepl.core.formats.safetensors_file import encode_safetensors

#: The fixed token id A1111 stores in ``string_to_token`` (it is never used for lookups).
A1111_TOKEN_ID = 265
#: Allowed file suffixes per format; the first is added when the path has none.
SUFFIXES = {
    "safetensors": (".safetensors",),
    "pt": (".pt",),
    "diffusers": (".bin", ".safetensors"),
    "png": (".png", ".webp"),
}
FORMATS = ("safetensors", "pt", "diffusers")


def _checked_vectors(path: Path, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate what is about to be written (same rules as reading) and return CPU float32 copies."""
    if not isinstance(vectors, dict) or not vectors:
        raise EmbeddingError(path, f"nothing to write: expected {{{SINGLE!r}: [N, D]}} or clip_l + clip_g vectors")
    keys = set(vectors)
    if keys not in ({SINGLE}, {CLIP_L, CLIP_G}):
        raise EmbeddingError(
            path, f"cannot write vectors keyed {sorted(keys)}; expected {{{SINGLE!r}}} or {{{CLIP_L!r}, {CLIP_G!r}}}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in vectors.items():
        if not isinstance(value, torch.Tensor) or value.ndim != 2 or not value.is_floating_point():
            raise EmbeddingError(path, f"vectors[{key!r}] is {describe_value(value)}; expected a float tensor [N, D]")
        count = int(value.shape[0])
        if not 1 <= count <= MAX_VECTORS or value.shape[1] == 0:
            raise EmbeddingError(path, f"vectors[{key!r}] has shape {list(value.shape)}; expected 1..{MAX_VECTORS} vectors")
        tensor = value.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
        if not bool(torch.isfinite(tensor).all()):
            raise EmbeddingError(path, f"vectors[{key!r}] contains NaN or infinite values; refusing to save them")
        out[key] = tensor
    if len({t.shape[0] for t in out.values()}) != 1:
        raise EmbeddingError(path, "clip_l and clip_g must have the same number of vectors")
    return out


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (resolved, links followed) lies inside ``folder``: no ``..``, no link leading out."""
    real_folder = os.path.realpath(folder)
    return os.path.realpath(path).startswith(real_folder.rstrip(os.sep) + os.sep)


def _target(path: Path | str, fmt: str, overwrite: bool, within: Path | None = None) -> Path:
    """Check the format and suffix (adding the default suffix when there is none), that the destination is
    inside ``within`` (when given) and the overwrite rule. Creates nothing."""
    path = Path(path)
    if fmt not in SUFFIXES:
        raise EmbeddingError(path, f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    allowed = SUFFIXES[fmt]
    if not path.suffix:
        path = path.with_name(path.name + allowed[0])
    elif path.suffix.lower() not in allowed:
        raise EmbeddingError(
            path, f"a {fmt} file must be named *{' or *'.join(allowed)}, not *{path.suffix}; change the name or the format"
        )
    if within is not None and not _inside(path, within):
        raise EmbeddingError(path, f"refusing to write outside {within}: the name leads out of the folder "
                             "(a '..', a '/' or a symbolic link in it)")
    if path.exists() and not overwrite:
        raise EmbeddingError(path, "already exists; pass --overwrite to replace it, or choose another name")
    if path.is_dir():
        raise EmbeddingError(path, "is a folder; give a file name")
    return path


@contextlib.contextmanager
def _new_folders(path: Path) -> Iterator[None]:
    """Create ``path``'s missing parent folders; remove those created here again if the block fails
    (a failed ``--to diffusers`` leaves no empty ``<name>/`` folder behind)."""
    missing: list[Path] = []
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbeddingError(path, f"cannot create the folder {path.parent}: {write_error_text(exc, path.parent / 'x')}") from None
    try:
        yield
    except BaseException:
        for created in missing:  # deepest first
            with contextlib.suppress(OSError):
                created.rmdir()
        raise


def _publish(path: Path, data: bytes, overwrite: bool) -> None:
    with _new_folders(path):
        try:
            atomic_write_bytes(path, data, overwrite=overwrite)
        except FileExistsError:
            raise EmbeddingError(path, "already exists; pass --overwrite to replace it, or choose another name") from None
        except OSError as exc:
            raise EmbeddingError(path, write_error_text(exc, path)) from None


def a1111_dict(vectors: torch.Tensor, name: str, step, checkpoint_hash, checkpoint_name) -> dict:
    """The dict of an A1111 ``.pt`` (and of an image card's JSON), in A1111's key order."""
    return {
        "string_to_token": {"*": A1111_TOKEN_ID},
        "string_to_param": {"*": vectors},
        "name": name,
        "step": step,
        "sd_checkpoint": checkpoint_hash,
        "sd_checkpoint_name": checkpoint_name,
    }


def _metadata(name, step, checkpoint_hash, checkpoint_name, init_text, count: int) -> dict[str, str]:
    meta = {"name": name, "vectors": str(count), "sdrepl_version": __version__}
    optional = {"step": step, "sd_checkpoint": checkpoint_hash, "sd_checkpoint_name": checkpoint_name,
                "init_text": init_text}
    meta.update({key: str(value) for key, value in optional.items() if value is not None})
    return meta


def diffusers_token(name: str) -> str:
    """The token diffusers files use for ``name``: ``<name>`` (kept as is when already wrapped)."""
    return name if name.startswith("<") and name.endswith(">") else f"<{name}>"


def write_embedding(
    path: Path,
    vectors: dict[str, torch.Tensor],
    fmt: str = "safetensors",
    *,
    name: str,
    step: int | None = None,
    checkpoint_hash: str | None = None,
    checkpoint_name: str | None = None,
    init_text: str | None = None,
    overwrite: bool = False,
    within: Path | None = None,
) -> Path:
    """Write ``vectors`` to ``path`` in ``fmt`` (see module docstring) atomically; return the path written.

    A path without a suffix gets the format's default one. Raises EmbeddingError when the file exists
    (and ``overwrite`` is false), the suffix does not match the format, the vectors are invalid, the
    format cannot hold them (``diffusers`` holds single-encoder vectors only), the destination resolves
    outside ``within`` (give it whenever a name from a file or a user chose the path), or the disk is full
    (the message names the folder; folders created for the file are removed again).
    """
    if fmt == "png":
        raise EmbeddingError(path, "use write_png_card for picture cards")
    path = _target(path, fmt, overwrite, within)
    checked = _checked_vectors(path, vectors)
    count = next(iter(checked.values())).shape[0]
    meta = _metadata(name, step, checkpoint_hash, checkpoint_name, init_text, count)
    pair = SINGLE not in checked
    if fmt == "safetensors":
        tensors = dict(checked) if pair else {"emb_params": checked[SINGLE]}
        data = encode_safetensors(tensors, meta)
    elif pair and fmt == "pt":
        # Only the two tensors: A1111 moves every value of a clip_l/clip_g dict to the device, so a
        # metadata string beside them would break loading there (the name is the file stem anyway).
        buffer = io.BytesIO()
        torch.save({CLIP_L: checked[CLIP_L], CLIP_G: checked[CLIP_G]}, buffer)
        data = buffer.getvalue()
    elif pair:
        raise EmbeddingError(path, "diffusers' embedding layout holds one vector set, not SDXL's two (clip_l + "
                             "clip_g): convert to safetensors or pt instead; diffusers loads that file with two "
                             "load_textual_inversion calls (state['clip_l'] into text_encoder/tokenizer, "
                             "state['clip_g'] into text_encoder_2/tokenizer_2)")
    elif fmt == "pt":
        buffer = io.BytesIO()
        torch.save(a1111_dict(checked[SINGLE], name, step, checkpoint_hash, checkpoint_name), buffer)
        data = buffer.getvalue()
    else:  # diffusers
        token = diffusers_token(name)
        if path.suffix.lower() == ".safetensors":
            data = encode_safetensors({token: checked[SINGLE]}, meta)
        else:
            buffer = io.BytesIO()
            torch.save({token: checked[SINGLE]}, buffer)
            data = buffer.getvalue()
    _publish(path, data, overwrite)
    return path


def write_png_card(
    path: Path,
    vectors: dict[str, torch.Tensor],
    *,
    name: str,
    step: int | None,
    preview=None,
    checkpoint_hash: str | None = None,
    checkpoint_name: str | None = None,
    overwrite: bool = False,
    within: Path | None = None,
) -> Path:
    """Write an A1111 image embedding (``.png``: text chunk + data cube; ``.webp``: lossless, data cube).

    ``preview`` is the picture shown in the middle (a plain one with the name is drawn when None).
    Raises EmbeddingError like :func:`write_embedding`; SDXL pairs cannot be written as cards.
    """
    path = _target(path, "png", overwrite, within)
    checked = _checked_vectors(path, vectors)
    if SINGLE not in checked:
        raise EmbeddingError(path, "picture cards hold single-encoder embeddings only; save SDXL pairs as .safetensors")
    card = a1111_dict(checked[SINGLE], name, step, checkpoint_hash, checkpoint_name)
    image = build_card_image(card, checked[SINGLE], preview if preview is not None else default_preview(name, step), path)
    try:
        with _new_folders(path), atomic_writer(path, overwrite=overwrite) as tmp:
            if path.suffix.lower() == ".webp":
                image.save(tmp, format="WEBP", lossless=True, quality=100, exact=True)
            else:
                from PIL.PngImagePlugin import PngInfo

                info = PngInfo()
                info.add_text("sd-ti-embedding", encode_text_chunk(card))
                image.save(tmp, format="PNG", pnginfo=info)
    except FileExistsError:
        raise EmbeddingError(path, "already exists; pass --overwrite to replace it, or choose another name") from None
    except OSError as exc:
        raise EmbeddingError(path, write_error_text(exc, path)) from None
    return path
