"""Converting an embedding to another format, written beside the original with the same trigger.

The file name is the key (spec section 4): a converted copy that got a new stem would answer to a new
trigger, so the output names are chosen to keep the trigger (``<trigger>`` below; for most files it is
the file stem, for cards and ``learned_embeds`` files it is the name inside):

=============  ==============================================  =========================================
``--to``       written to (in the original's folder)           layout
=============  ==============================================  =========================================
safetensors    ``<trigger>.safetensors``                       ``emb_params`` (or clip_l/clip_g) + metadata
pt             ``<trigger>.pt``                                A1111 ``string_to_param`` (SDXL: clip_l/clip_g)
diffusers      ``<trigger>/learned_embeds.bin``                ``{"<trigger>": [N, D]}``: diffusers' own
                                                               naming; the generic stem makes the token the
                                                               trigger, so it stays ``<trigger>`` (this
                                                               layout has no room for step/model metadata)
png            ``<trigger>.png``                               A1111 image card (text chunk + pixels)
=============  ==============================================  =========================================

Consequence, on purpose: while the original stays in a watched folder, the copy is a second file
claiming the same trigger, with the same vectors. The library counts it as the same embedding (one entry,
several ``files``; see ``core/library_state.py``): no collision warning, and the original (the older file)
stays the one served. Delete either file when you like: the embedding stays while one remains. An
existing output is replaced only with ``overwrite`` (``--overwrite``).

Safety: the trigger can come from inside the file; a name that is not a valid name is never used as one
(see ``core/names.py``), and the writers refuse any output beside the original that resolves outside
the original's folder (``..``, links), so a hostile name cannot write elsewhere. A failed write (a full
disk) says "no space left" with the folder, and a ``diffusers`` folder created for it is removed again.

Command line: ``python -m sdrepl.core.convert FILE --to pt [--overwrite] [--output PATH]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sdrepl.core.errors import EmbeddingError
from sdrepl.core.hashing import sha256_bytes

if TYPE_CHECKING:  # the readers and writers import torch: `sdrepl convert /missing.pt` answers without it
    from sdrepl.core.embedding import Embedding

TARGETS = ("safetensors", "pt", "diffusers", "png")


def output_path(emb: Embedding, to: str) -> Path:
    """Where :func:`convert_embedding` writes ``emb`` converted to ``to`` (see the module table)."""
    folder = emb.path.parent
    if to == "diffusers":
        return folder / emb.trigger / "learned_embeds.bin"
    if to in ("safetensors", "pt", "png"):
        return folder / f"{emb.trigger}.{to}"
    raise EmbeddingError(emb.path, f"cannot convert to {to!r}; expected one of {', '.join(TARGETS)}")


def convert_embedding(emb: Embedding, to: str, *, overwrite: bool = False, output: Path | None = None) -> Path:
    """Write ``emb`` in format ``to`` (beside the original unless ``output`` is given); return the new path.

    Raises EmbeddingError when the output exists (without ``overwrite``), would be the source file itself,
    or the format cannot hold the vectors (SDXL pairs convert to safetensors and pt; diffusers' layout has
    one vector set and is refused with the route diffusers loads a pair by).
    """
    from sdrepl.core.formats import write_embedding, write_png_card

    target = Path(output) if output is not None else output_path(emb, to)
    within = None if output is not None else emb.path.parent  # an explicit --output is the user's choice
    if target.exists() and target.resolve() == emb.path.resolve():
        raise EmbeddingError(emb.path, f"is already a {to} file; nothing to convert")
    data = emb.data
    if to == "png":
        return write_png_card(
            target, data.vectors, name=emb.trigger, step=data.step, preview=None,
            checkpoint_hash=data.checkpoint_hash, checkpoint_name=data.checkpoint_name, overwrite=overwrite,
            within=within,
        )
    if to not in TARGETS:
        raise EmbeddingError(emb.path, f"cannot convert to {to!r}; expected one of {', '.join(TARGETS)}")
    return write_embedding(
        target, data.vectors, to, name=emb.trigger, step=data.step, checkpoint_hash=data.checkpoint_hash,
        checkpoint_name=data.checkpoint_name, init_text=data.init_text, overwrite=overwrite, within=within,
    )


def embedding_from_file(path: Path) -> Embedding:
    """Read one file into an :class:`Embedding` outside any library (trigger per spec section 4)."""
    from sdrepl.core.embedding import Embedding
    from sdrepl.core.formats import decide_trigger, read_embedding_bytes, read_file_bytes

    path = Path(path)
    raw, st = read_file_bytes(path)  # one bounded, non-blocking read for the parse and the hash
    data = read_embedding_bytes(path, raw)
    trigger = decide_trigger(path, data)
    return Embedding(trigger, trigger, path, data, sha256_bytes(raw), st.st_size, st.st_mtime_ns)


def convert_file(path: Path, to: str, *, overwrite: bool = False, output: Path | None = None) -> Path:
    """Read ``path`` and convert it (see :func:`convert_embedding`)."""
    return convert_embedding(embedding_from_file(path), to, overwrite=overwrite, output=output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdrepl convert",
        description="Convert an embedding file to another format, beside the original, keeping its trigger.",
    )
    parser.add_argument("file", type=Path, help="the embedding file to convert (.pt, .bin, .safetensors, .png)")
    parser.add_argument("--to", required=True, choices=TARGETS, help="the output format")
    parser.add_argument("--output", type=Path, help="write here instead of beside the original")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``sdrepl convert``: returns the exit status (0 ok, 2 for a usage error or a file that cannot be
    converted, with one line saying why, like every other sdrepl command)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage error
        return 0 if exc.code in (0, None) else 2
    if not os.path.lexists(args.file):  # before the readers (and torch) are imported
        print(f"sdrepl: {EmbeddingError(args.file, 'no such file')}", file=sys.stderr)
        return 2
    from sdrepl.core.dependencies import torch_problem

    unsafe = torch_problem()
    if unsafe is not None:
        print(f"sdrepl: {unsafe}", file=sys.stderr)
        return 2
    try:
        written = convert_file(args.file, args.to, overwrite=args.overwrite, output=args.output)
    except EmbeddingError as exc:
        print(f"sdrepl: {exc}", file=sys.stderr)
        return 2
    print(written)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
