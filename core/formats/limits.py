"""How much a file may cost before it is materialised: one definition per kind of file, used by every reader.

An embedding is at most 75 vectors of at most 2048 values (an SDXL pair is 768 + 1280 = 2048 wide), a
few hundred KiB. A hostile file can be tiny and still ask for GiBs (a pickle calling ``bytearray(2**30)``,
a 4-byte storage viewed as ``[1, 2**27]`` with stride 0, a zip member declaring 1 GiB, a PNG header
declaring 12800x12800 pixels, a card whose JSON inflates to 60 MB). The readers check every such
declared size against a :class:`Limits` *before* allocating anything, so the cost of reading a file is
bounded by these numbers whatever it says about itself.

:data:`EMBEDDING_LIMITS` is what an embeddings folder may hold. Other kinds of file read through the same
readers get their own instance: :func:`lora_limits` bounds a LoRA by its file size (stored tensors can never
hold more values than the file has bytes, so a factor over the size catches views that multiply data),
and ``dataclasses.replace(EMBEDDING_LIMITS, ...)`` overrides single fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdrepl.core.embedding import MAX_VECTORS

#: The widest vector set an embedding can have: SDXL's clip_l (768) + clip_g (1280).
MAX_EMBEDDING_WIDTH = 2048


@dataclass(frozen=True)
class Limits:
    """The most one file may declare or cost; every field is checked before the matching allocation."""

    #: What the file is expected to be, for messages ("which an embedding never needs").
    kind: str
    #: Largest file read at all (bytes). For embeddings: a 75-vector SDXL pair is under 1 MiB; anything far
    #: larger is a checkpoint or LoRA in the wrong folder.
    max_file_bytes: int
    #: Most tensors in one file.
    max_tensors: int
    #: Most values in one tensor (its shape's product).
    max_tensor_values: int
    #: Most values over all tensors and over all storages (each counted separately).
    max_total_values: int
    #: Largest pickle stream (``data.pkl``): unpickling can multiply its size by ~40 in Python objects.
    max_pickle_bytes: int
    #: Most members of a torch zip archive.
    max_zip_members: int
    #: Largest picture decoded for its pixels (width x height).
    max_image_pixels: int
    #: Largest JSON text inflated from a picture card (bytes), and most numbers parsed from it.
    max_json_bytes: int

    @property
    def max_pickle_objects(self) -> int:
        """Containers and calls a pickle may build (an empty dict is one byte of pickle and ~64 bytes of
        memory): what torch.save writes per tensor (about 8), with room for the dict around them."""
        return 16 * self.max_tensors + 256

    @property
    def max_json_numbers(self) -> int:
        """Numbers a card's JSON may hold: the vectors plus a few for step and token ids."""
        return self.max_total_values + 64


EMBEDDING_LIMITS = Limits(
    kind="embedding",
    max_file_bytes=32 * 1024 * 1024,
    max_tensors=8,
    max_tensor_values=MAX_VECTORS * MAX_EMBEDDING_WIDTH,
    max_total_values=MAX_VECTORS * MAX_EMBEDDING_WIDTH,
    max_pickle_bytes=64 * 1024,
    max_zip_members=64,
    max_image_pixels=8_000_000,
    # float32 values written as Python floats take at most ~25 characters each.
    max_json_bytes=4 * 1024 * 1024,
)


def lora_limits(file_size: int, *, values_per_byte: int = 1, max_file_bytes: int = 4 * 1024**3) -> Limits:
    """Limits for a LoRA file of ``file_size`` bytes.

    Stored tensors hold at most one value per byte (8-bit types); ``values_per_byte`` allows that many
    values per file byte in total (1 means no tensor may view more data than was stored), so a file that
    views one storage many times over is refused before anything is copied.
    """
    total = max(1, file_size) * values_per_byte
    return Limits(
        kind="LoRA",
        max_file_bytes=max_file_bytes,
        max_tensors=20_000,
        max_tensor_values=total,
        max_total_values=total,
        max_pickle_bytes=8 * 1024 * 1024,
        max_zip_members=20_100,
        max_image_pixels=0,
        max_json_bytes=0,
    )
