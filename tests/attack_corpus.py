"""Hostile embedding files, generated (no binary blobs): the techniques of picklescan's, fickling's and
modelscan's test suites, zip tricks, memory bombs and oversized pictures.

Every builder returns the file's bytes. :data:`CORPUS` lists ``Attack(name, file name, builder, expected
reason fragment)``; the payloads that would run code create ``MARKER`` (a path given to the builder), so a
test can assert that nothing ran. Shared by ``tests/core/test_formats_attacks.py`` (reasons, no code ran)
and the memory test (peak RSS of a process reading each file).
"""

from __future__ import annotations

import base64
import io
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# ---------------------------------------------------------------- pickle assembly


def _unicode(text: str) -> bytes:
    raw = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _int(value: int) -> bytes:
    if 0 <= value < 2**31:
        return pickle.BININT + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(raw)]) + raw


def _proto(version: int = 2) -> bytes:
    return pickle.PROTO + bytes([version])


def call(module: str, name: str, *args: bytes, protocol: int = 2) -> bytes:
    """A pickle calling ``module.name(*args)`` with GLOBAL + REDUCE (the classic payload)."""
    return _proto(protocol) + _global(module, name) + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE + pickle.STOP


def shell(marker: Path) -> bytes:
    return _unicode(f"touch {marker}")


def py(marker: Path) -> bytes:
    return _unicode(f"open({str(marker)!r}, 'w').close()")


def stack_global(module: str, name: str, arg: bytes) -> bytes:
    """Protocol 4: the callable's names pushed as strings, resolved by STACK_GLOBAL."""
    short = lambda s: pickle.SHORT_BINUNICODE + bytes([len(s)]) + s.encode()  # noqa: E731
    return (_proto(4) + short(module) + pickle.MEMOIZE + short(name) + pickle.MEMOIZE + pickle.STACK_GLOBAL
            + arg + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)


def inst(module: str, name: str, marker: Path) -> bytes:
    """Protocol 0: INST names the class and calls it with the marked arguments."""
    return b"(S'touch " + str(marker).encode() + b"'\ni" + f"{module}\n{name}\n".encode() + b"."


def obj(module: str, name: str, marker: Path) -> bytes:
    """Protocol 1: OBJ calls the class popped after MARK with the rest as arguments."""
    return b"(" + _global(module, name) + shell(marker) + pickle.OBJ + pickle.STOP


def newobj(module: str, name: str, marker: Path) -> bytes:
    """NEWOBJ: ``cls.__new__(cls, *args)`` on a dangerous class."""
    return (_proto() + _global(module, name) + pickle.MARK + pickle.MARK + _unicode("sh") + _unicode("-c")
            + shell(marker) + pickle.LIST + pickle.TUPLE + pickle.NEWOBJ + pickle.STOP)


def build(marker: Path) -> bytes:
    """BUILD with a state that sets ``__setstate__`` to a callable (fickling's BUILD technique)."""
    return (_proto() + _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
            + pickle.EMPTY_DICT + _unicode("__setstate__") + _global("os", "system") + pickle.SETITEM
            + pickle.BUILD + shell(marker) + pickle.BUILD + pickle.STOP)


def nested(marker: Path) -> bytes:
    """A pickle whose payload is a second pickle handed to ``pickle.loads``."""
    inner = call("os", "system", shell(marker))
    return _proto() + _global("_pickle", "loads") + pickle.MARK + pickle.BINBYTES + struct.pack("<I", len(inner)) + inner + pickle.TUPLE + pickle.REDUCE + pickle.STOP


# ---------------------------------------------------------------- torch.save-shaped files


def a1111_dict(vectors: torch.Tensor | None = None) -> dict:
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(2, 768) if vectors is None else vectors},
            "name": "x", "step": 1}


def saved(obj: object, **kw) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kw)
    return buffer.getvalue()


def torch_zip(pkl: bytes, members: dict[str, bytes] | None = None, *, top: str = "archive",
              deflate: set[str] = frozenset()) -> bytes:
    """A zip laid out like torch.save's: ``top/data.pkl``, then ``members`` (names relative to ``top``)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{top}/data.pkl", pkl)
        for name, data in (members or {"version": b"3\n"}).items():
            info = zipfile.ZipInfo(f"{top}/{name}")
            info.compress_type = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
            archive.writestr(info, data)
    return buffer.getvalue()


def with_pickle(data: bytes, pkl: bytes) -> bytes:
    """A real torch.save zip with its data.pkl replaced (every other member kept)."""
    source = zipfile.ZipFile(io.BytesIO(data))
    members = {i.filename.split("/", 1)[1]: source.read(i) for i in source.infolist() if not i.filename.endswith("data.pkl")}
    return torch_zip(pkl, members)


def tensor_pickle(numel: int, shape: tuple[int, ...], stride: tuple[int, ...], *, key: str = "0") -> bytes:
    """data.pkl of ``{"emb_params": tensor}``: a FloatStorage of ``numel`` viewed with ``shape``/``stride``."""
    pid = (pickle.MARK + _unicode("storage") + _global("torch", "FloatStorage") + _unicode(key) + _unicode("cpu")
           + _int(numel) + pickle.TUPLE + pickle.BINPERSID)
    ints = lambda values: pickle.MARK + b"".join(_int(v) for v in values) + pickle.TUPLE  # noqa: E731
    tensor = (_global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK + pid + _int(0) + ints(shape)
              + ints(stride) + pickle.NEWFALSE + _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE
              + pickle.REDUCE + pickle.TUPLE + pickle.REDUCE)
    return _proto() + pickle.EMPTY_DICT + _unicode("emb_params") + tensor + pickle.SETITEM + pickle.STOP


def stride_zero_view() -> bytes:
    """One stored float viewed as ``[1, 2**27]`` with stride 0: 4 bytes that would copy to 512 MiB."""
    return torch_zip(tensor_pickle(1, (1, 2**27), (0, 0)), {"data/0": bytes(4), "version": b"3\n"})


def huge_storage_declared() -> bytes:
    """A storage declaring 2**34 floats (64 GiB) backed by 4 bytes."""
    return torch_zip(tensor_pickle(2**34, (1, 768), (768, 1)), {"data/0": bytes(4), "version": b"3\n"})


def compressed_storage(size: int = 128 * 1024 * 1024) -> bytes:
    """A deflated storage member that declares ``size`` bytes in a file of a few hundred KiB."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compresslevel=1) as archive:
        archive.writestr("archive/data.pkl", tensor_pickle(size // 4, (75, 768), (768, 1)))
        archive.writestr("archive/version", b"3\n")
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as fh:
            chunk = bytes(1 << 22)
            for _ in range(size // len(chunk)):
                fh.write(chunk)
    return buffer.getvalue()


def memo_bomb() -> bytes:
    """LONG_BINPUT into slot 2**32-16: CPython's unpickler grows its memo table to that many slots."""
    return _proto() + pickle.EMPTY_DICT + pickle.LONG_BINPUT + struct.pack("<I", 2**32 - 16) + pickle.STOP


def legacy_storage_bomb() -> bytes:
    """A pre-1.6 torch file whose storage declares 2**32 floats, backed by 8 bytes."""
    magic = _proto() + _int(0x1950A86A20F9469CFC6C) + pickle.STOP
    version = _proto() + _int(1001) + pickle.STOP
    info = _proto() + pickle.EMPTY_DICT + pickle.STOP
    main = tensor_pickle(2**32, (1, 768), (768, 1))
    main = main.replace(_unicode("cpu") + _int(2**32) + pickle.TUPLE, _unicode("cpu") + _int(2**32) + pickle.NONE + pickle.TUPLE)
    keys = _proto() + pickle.EMPTY_LIST + pickle.MARK + _unicode("0") + pickle.APPENDS + pickle.STOP
    return magic + version + info + main + keys + struct.pack("<Q", 2) + bytes(8)


def torchscript() -> bytes:
    """A TorchScript archive (torch.jit.save of a traced Linear)."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------- pictures


def text_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk (length, type, body, CRC)."""
    return _chunk(kind, body)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png(width: int, height: int, *, chunks: tuple[bytes, ...] = (), bit_depth: int = 1, colour: int = 0) -> bytes:
    """A valid PNG of zero pixels (1-bit grayscale by default: a huge picture in a small file)."""
    row = 1 + (width * bit_depth * (3 if colour == 2 else 1) + 7) // 8
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(bytes(row * min(height - y, 256))) for y in range(0, height, 256)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(chunks) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def big_json(values: int) -> bytes:
    """A card's JSON with one vector of ``values`` zeros (3 bytes each), built without a Python list."""
    return b'{"string_to_param": {"*": {"TORCHTENSOR": [[' + b"0, " * (values - 1) + b'0]]}}, "name": "x"}'



def text_card(raw_json: bytes, *, compressed: bool = False) -> bytes:
    """A small PNG whose ``sd-ti-embedding`` chunk holds ``raw_json`` (tEXt, or zTXt when ``compressed``)."""
    text = base64.b64encode(raw_json)
    chunk = (_chunk(b"zTXt", b"sd-ti-embedding\x00\x00" + zlib.compress(text, 9)) if compressed
             else _chunk(b"tEXt", b"sd-ti-embedding\x00" + text))
    return png(16, 16, chunks=(chunk,))


def pixel_card(raw_json: bytes) -> bytes:
    """A data-cube card (no text chunk) whose pixels carry zlib(``raw_json``), built by sdrepl's own writer."""
    from PIL import Image

    from sdrepl.core.formats.image_card import build_data_cube

    payload = zlib.compress(raw_json, 1)
    low, high = build_data_cube(payload, 64, torch.ones(8))
    width = low.shape[1]
    canvas = np.zeros((64, width + 3 + high.shape[1], 3), dtype=np.uint8)
    canvas[:, :width] = low
    canvas[:, width + 1] = 200  # the "preview": one lit column between the two black separators
    canvas[:, width + 3 :] = high
    buffer = io.BytesIO()
    Image.fromarray(canvas, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Attack:
    name: str
    filename: str
    build: Callable[[Path], bytes]
    #: A fragment the refusal reason must contain.
    reason: str
    #: Skipped silently (NotAnEmbedding) rather than listed with a reason.
    silent: bool = False
    #: ``pickle.loads`` of the bytes (never done by sdrepl) would create the marker: the payload is live.
    live: bool = False


CODE = [
    Attack("global-os-system", "evil.pt", lambda m: call("os", "system", shell(m)), "it refers to os.system", live=True),
    Attack("global-posix-system", "evil.bin", lambda m: call("posix", "system", shell(m)), "posix.system", live=True),
    Attack("global-eval", "evil.pt", lambda m: call("builtins", "eval", py(m)),
           "it refers to builtins.eval, which an embedding never needs", live=True),
    Attack("global-exec", "evil.ckpt", lambda m: call("builtins", "exec", py(m)), "builtins.exec", live=True),
    Attack("global-subprocess", "evil.pt", lambda m: call("subprocess", "getoutput", shell(m)), "subprocess.getoutput", live=True),
    Attack("global-getattr", "evil.pt", lambda m: call("builtins", "getattr", _unicode("os"), _unicode("system")),
           "builtins.getattr"),
    Attack("global-runpy", "evil.pt", lambda m: call("runpy", "_run_code", py(m), pickle.EMPTY_DICT), "runpy._run_code", live=True),
    Attack("global-torch-load", "evil.pt", lambda m: call("torch", "load", _unicode(str(m))), "torch.load"),
    Attack("global-numpy", "evil.pt", lambda m: call("numpy.core.multiarray", "_reconstruct", _unicode("x")),
           "numpy.core.multiarray._reconstruct"),
    Attack("stack-global-exec", "evil.pt", lambda m: stack_global("builtins", "exec", py(m)), "builtins.exec", live=True),
    Attack("inst-os-system", "evil.pt", lambda m: inst("os", "system", m), "os.system (through the INST opcode)", live=True),
    Attack("obj-os-system", "evil.pt", lambda m: obj("os", "system", m), "os.system", live=True),
    Attack("newobj-popen", "evil.pt", lambda m: newobj("subprocess", "Popen", m), "subprocess.Popen"),
    Attack("build-setstate", "evil.pt", build, "os.system", live=True),
    Attack("nested-pickle", "evil.pt", nested, "_pickle.loads", live=True),
    Attack("zip-os-system", "evil.pt", lambda m: with_pickle(saved(a1111_dict()), call("os", "system", shell(m))),
           "os.system"),
    Attack("zip-inst", "evil.pt", lambda m: with_pickle(saved(a1111_dict()), inst("os", "system", m)),
           "os.system (through the INST opcode)"),
]

FORMAT = [
    Attack("protocol-4", "p4.pt", lambda m: saved(a1111_dict(), pickle_protocol=4), "pickle protocol 4"),
    Attack("protocol-5", "p5.pt", lambda m: saved(a1111_dict(), pickle_protocol=5), "pickle protocol 5"),
    Attack("protocol-0-in-zip", "p0.pt", lambda m: with_pickle(saved(a1111_dict()), pickle.dumps({"name": "x"}, 0)),
           "pickle protocol 0 or 1"),
    Attack("torchscript", "model.pt", lambda m: torchscript(), "it is a TorchScript archive"),
    Attack("zip-second-pickle", "two.pt", lambda m: _second_pickle(m), "a second pickle"),
    Attack("zip-npy", "arr.pt", lambda m: torch_zip(pickle.dumps({}, 2), {"version": b"3\n", "x.npy": b"\x93NUMPY"}),
           "a numpy array"),
    Attack("zip-duplicate", "dup.pt", lambda m: _duplicate_member(m), "two members named"),
    Attack("zip-unexpected", "odd.pt", lambda m: torch_zip(pickle.dumps({}, 2), {"version": b"3\n", "run.sh": b"x"}),
           "an unexpected member"),
]

MEMORY = [
    Attack("bytearray-1GiB", "bomb.pt", lambda m: call("builtins", "bytearray", _int(2**30)), "builtins.bytearray"),
    Attack("bytearray-in-zip", "bomb.pt", lambda m: with_pickle(saved(a1111_dict()), call("builtins", "bytearray", _int(2**30))),
           "builtins.bytearray"),
    Attack("stride-zero-view", "view.pt", lambda m: stride_zero_view(), "viewed from a storage of 1 values"),
    Attack("huge-storage", "huge.pt", lambda m: huge_storage_declared(), "declares a storage of 17,179,869,184 values"),
    Attack("compressed-storage", "zipbomb.pt", lambda m: compressed_storage(), "is compressed"),
    Attack("memo-bomb", "memo.pt", lambda m: memo_bomb(), "memo slot"),
    Attack("dict-spray", "spray.pt", lambda m: _proto() + pickle.EMPTY_LIST + pickle.MARK + pickle.EMPTY_DICT * 60_000
           + pickle.APPENDS + pickle.STOP, "containers and calls"),
    Attack("legacy-storage-bomb", "legacy.pt", lambda m: legacy_storage_bomb(), "declares a storage of"),
    Attack("huge-png", "photo.png", lambda m: png(12800, 12800), "12800x12800", silent=True),
    Attack("text-card-60MB-json", "card.png", lambda m: text_card(big_json(2_000_000), compressed=True), "more than"),
    Attack("text-card-big-tEXt", "card.png", lambda m: text_card(big_json(1_500_000)), "more than"),
    Attack("text-card-many-numbers", "card.png", lambda m: text_card(big_json(1_000_000).replace(b" ", b"")),
           "numbers, more than any embedding holds"),
    Attack("pixel-card-60MB-json", "card.png", lambda m: pixel_card(big_json(30_000_000)), "more than"),
    Attack("safetensors-huge-tensor", "wide.safetensors", lambda m: _safetensors_wide(), "values"),
]

CORPUS = CODE + FORMAT + MEMORY


def _second_pickle(marker: Path) -> bytes:
    good = zipfile.ZipFile(io.BytesIO(saved(a1111_dict()))).read("archive/data.pkl")
    return torch_zip(good, {"data/0": bytes(6144), "version": b"3\n", "extra/data.pkl": call("os", "system", shell(marker))})


def _duplicate_member(marker: Path) -> bytes:
    good = zipfile.ZipFile(io.BytesIO(saved(a1111_dict()))).read("archive/data.pkl")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", good)
        archive.writestr("archive/data/0", bytes(6144))
        archive.writestr("archive/data.pkl", call("os", "system", shell(marker)))
    return buffer.getvalue()


def _safetensors_wide() -> bytes:
    from sdrepl.core.formats.safetensors_file import encode_safetensors

    return encode_safetensors({"emb_params": torch.zeros(1, 200_000)}, {})
