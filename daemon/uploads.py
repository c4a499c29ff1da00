"""Training data sent by a remote client: ``!train NAME --data DIR`` from another machine.

A remote client cannot name a folder on the daemon's disk (``remote_files.refuse_daemon_paths``), so the
REPL sends the folder instead (``repl/uploads.py``): ``upload_begin``, then each file in chunks
(``upload_chunk``, one reply per chunk, so neither end holds more than a chunk), then ``upload_end``,
whose reply is a token ``upload:<id>`` that ``train``'s ``data`` takes. The files land in a private temp
folder of the daemon (0700), flat as a training folder is: pictures and caption ``.txt`` files, names
checked (no folders, no hidden names, nothing twice), sizes bounded. What they hold is then checked by
``train`` exactly as a local folder is (the same dataset loader). An upload belongs to its connection:
another connection cannot use it, and one not yet used by a ``train`` is removed when its connection
closes; all are removed when the daemon exits.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import itertools
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sdrepl.core.training.dataset import IMAGE_SUFFIXES
from sdrepl.daemon.context import DaemonContext
from sdrepl.daemon.params import Params
from sdrepl.daemon.protocol import BadRequest
from sdrepl.daemon.registry import Request, handler

#: Bounds of one upload: files, bytes per file, bytes in all, bytes per chunk (before base64).
MAX_FILES = 10_000
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_UPLOAD_BYTES = 2 * 1024 * 1024 * 1024
CHUNK_BYTES = 4 * 1024 * 1024
#: Uploads a connection may hold at once.
MAX_PER_CONNECTION = 4
ALLOWED_SUFFIXES = IMAGE_SUFFIXES | {".txt"}
#: What ``!push`` sends: an embedding or LoRA file (containers the readers know).
PUSH_SUFFIXES = frozenset({".pt", ".safetensors", ".bin", ".ckpt", ".png", ".webp"})


@dataclass
class Upload:
    id: str
    folder: Path
    owner: int
    files: int = 0
    bytes: int = 0
    sealed: bool = False
    used: bool = False
    names: set[str] = field(default_factory=set)
    current: str | None = None
    current_bytes: int = 0
    kind: str = "training"


_UPLOADS: dict[str, Upload] = {}
_ROOT: list[Path] = []
_IDS = itertools.count(1)


def _root() -> Path:
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="sdrepl-uploads-")))  # 0700
        atexit.register(shutil.rmtree, _ROOT[0], True)
    return _ROOT[0]


def check_name(name: str, kind: str = "training") -> str:
    """A flat file name of a training folder (a picture or a caption; a pushed file for ``push``), or BadRequest."""
    if (not name or "/" in name or "\\" in name or "\0" in name or name.startswith(".")
            or len(os.fsencode(name)) > 255):
        raise BadRequest(f"upload: {name!r} is not a file name of a training folder (no folders, no hidden "
                         "files, at most 255 bytes)")
    if kind == "init":
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            raise BadRequest(f"upload: {name!r}: an init picture is one of {', '.join(sorted(IMAGE_SUFFIXES))}")
        return name
    if kind == "push":
        if Path(name).suffix.lower() not in PUSH_SUFFIXES:
            raise BadRequest(f"upload: {name!r}: !push sends embedding or LoRA files "
                             f"({', '.join(sorted(PUSH_SUFFIXES))})")
        return name
    if Path(name).suffix.lower() not in ALLOWED_SUFFIXES:
        raise BadRequest(f"upload: {name!r}: only pictures ({', '.join(sorted(IMAGE_SUFFIXES))}) and .txt "
                         "captions are sent")
    return name


def _owned(token: str, owner: int) -> Upload:
    upload = _UPLOADS.get(token.removeprefix("upload:"))
    if upload is None or upload.owner != owner:
        raise BadRequest(f"upload {token!r} is not an upload of this connection (uploads do not outlive their "
                         "connection); send the folder again")
    return upload


def sealed(token: str, owner: int) -> Upload:
    """A finished upload of this connection (BadRequest otherwise)."""
    upload = _owned(token, owner)
    if not upload.sealed:
        raise BadRequest(f"upload {token!r} is not finished (upload_end); send the file again")
    return upload


def discard(token: str, owner: int) -> None:
    """Remove an upload of this connection now (``generate`` has read its init picture)."""
    upload = _UPLOADS.get(token.removeprefix("upload:"))
    if upload is not None and upload.owner == owner:
        del _UPLOADS[upload.id]
        shutil.rmtree(upload.folder, ignore_errors=True)


def init_file_for(token: str, owner: int) -> str:
    """The daemon-side file of a sealed ``init`` upload (an img2img picture ``generate`` reads; the
    handler discards the upload once the picture is decoded, so uploads never pile up)."""
    upload = _owned(token, owner)
    if upload.kind != "init":
        raise BadRequest(f"upload {token!r} was not sent as an init picture (upload_begin kind 'init')")
    if not upload.sealed or len(upload.names) != 1:
        raise BadRequest(f"upload {token!r} is not one finished picture (upload_end); send the picture again")
    return str(upload.folder / next(iter(upload.names)))


def folder_for(token: str, owner: int) -> str:
    """The daemon-side folder of a sealed upload, for ``train``'s ``data`` (marks it used)."""
    upload = _owned(token, owner)
    if upload.kind != "training":
        raise BadRequest(f"upload {token!r} was sent for !push, not as training data")
    if not upload.sealed:
        raise BadRequest(f"upload {token!r} is not finished (upload_end); send the folder again")
    upload.used = True
    return str(upload.folder)


def forget(owner: int) -> None:
    """A connection closed: remove its uploads that no ``train`` uses."""
    for key, upload in list(_UPLOADS.items()):
        if upload.owner == owner and not upload.used:
            del _UPLOADS[key]
            shutil.rmtree(upload.folder, ignore_errors=True)


@handler("upload_begin")
async def upload_begin(ctx: DaemonContext, params: dict, req: Request) -> dict:
    p = Params(params, "upload_begin")
    kind = p.text("kind", "training", choices=("training", "push", "init"))
    p.finish()
    owner = id(req.connection)
    if sum(1 for u in _UPLOADS.values() if u.owner == owner and not u.used) >= MAX_PER_CONNECTION:
        raise BadRequest(f"upload_begin: this connection already holds {MAX_PER_CONNECTION} unused uploads")
    key = str(next(_IDS))
    folder = Path(tempfile.mkdtemp(prefix=f"u{key}-", dir=_root()))
    _UPLOADS[key] = Upload(key, folder, owner, kind=kind)
    return {"upload": f"upload:{key}", "limits": {"files": MAX_FILES, "file_bytes": MAX_FILE_BYTES,
                                                  "bytes": MAX_UPLOAD_BYTES, "chunk_bytes": CHUNK_BYTES}}


@handler("upload_chunk")
async def upload_chunk(ctx: DaemonContext, params: dict, req: Request) -> dict:
    """Append a chunk to file ``name`` (files one after the other; ``final`` closes the file)."""
    p = Params(params, "upload_chunk")
    token = p.text("upload")
    name_text = p.text("name")
    data_text = p.text("data", "")
    final = p.flag("final", False)
    p.finish()
    upload = _owned(token, id(req.connection))
    name = check_name(name_text, upload.kind)
    if upload.kind in ("push", "init") and upload.names and name not in upload.names:
        raise BadRequest(f"upload_chunk: a {upload.kind} upload holds one file")
    if upload.sealed:
        raise BadRequest(f"upload_chunk: {token} is finished; begin a new upload")
    if len(data_text) > (CHUNK_BYTES * 4) // 3 + 4:
        raise BadRequest(f"upload_chunk: a chunk is at most {CHUNK_BYTES} bytes")
    try:
        data = base64.b64decode(data_text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"upload_chunk: 'data' is not base64 ({exc})") from None
    if upload.current != name:
        if upload.current is not None:
            raise BadRequest(f"upload_chunk: {upload.current!r} is not finished (send it with final: true first)")
        if name in upload.names:
            raise BadRequest(f"upload_chunk: {name!r} was already sent in this upload")
        if upload.files >= MAX_FILES:
            raise BadRequest(f"upload_chunk: more than {MAX_FILES} files in one upload")
        upload.current, upload.current_bytes = name, 0
    if upload.current_bytes + len(data) > MAX_FILE_BYTES:
        raise BadRequest(f"upload_chunk: {name!r} is larger than {MAX_FILE_BYTES} bytes, the limit for one picture")
    if upload.bytes + len(data) > MAX_UPLOAD_BYTES:
        raise BadRequest(f"upload_chunk: the upload is larger than {MAX_UPLOAD_BYTES} bytes in all")
    part = upload.folder / f".{name}.part"
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(part, flags, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    upload.current_bytes += len(data)
    upload.bytes += len(data)
    if final:
        os.link(part, upload.folder / name)  # never over an existing name
        part.unlink()
        upload.names.add(name)
        upload.files += 1
        upload.current = None
    return {"bytes": upload.bytes, "files": upload.files}


@handler("upload_end")
async def upload_end(ctx: DaemonContext, params: dict, req: Request) -> dict:
    p = Params(params, "upload_end")
    token = p.text("upload")
    p.finish()
    upload = _owned(token, id(req.connection))
    if upload.current is not None:
        raise BadRequest(f"upload_end: {upload.current!r} is not finished (send its last chunk with final: true)")
    upload.sealed = True
    return {"data": f"upload:{upload.id}", "files": upload.files, "bytes": upload.bytes}

