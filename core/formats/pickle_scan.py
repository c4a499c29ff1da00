"""Inspecting a ``torch.save`` file before anything in it is loaded: the gate in front of ``torch.load``.

``torch.load(weights_only=True)`` runs no code, but it still allocates whatever a file declares
(``bytearray(2**30)`` is on its allow-list, a storage may declare any size, a tiny storage may be viewed with
a huge shape and stride 0), and its refusals read like corruption. So a file is inspected first, in
four steps, each refusing with what it found:

1. **Container.** A zip archive (``torch.save``'s format since 1.6) may hold only the members torch.save
   writes, under one top folder: ``data.pkl`` once, ``data/<n>`` storages (stored, not compressed),
   ``version``, ``byteorder`` and the small ``.format_version``/``.storage_alignment``/``.data/*`` records.
   ``code/`` or ``constants.pkl`` means a TorchScript archive; a second ``.pkl``, a ``.npy``, a duplicate
   name or anything else is refused (A1111's ``modules/safe.py`` does the same). A legacy (pre-1.6) file
   is the magic-number, protocol and system-info pickles, the main pickle, the storage key list, then the
   raw storages: all five pickles are inspected and the storages must fit in the bytes that follow.
2. **Opcodes** (:func:`scan_opcodes`, no object is built): protocol 2 or 3 (what torch.save writes and
   the safe loader reads), only the opcodes torch.save emits, memo indices that exist, a bounded size.
   Every global named (``GLOBAL``, ``INST``, ``STACK_GLOBAL``) must be on :data:`ALLOWED_GLOBALS`.
3. **A restricted unpickler of our own** whose ``find_class`` returns inert stand-ins: a tensor becomes a
   :class:`TensorSpec` (storage, offset, shape, stride), a storage a :class:`StorageRef`; nothing is
   allocated for either.
4. **Sizes.** Each storage's declared size must be present in the file; each tensor's values and the
   total must be within the :class:`~sdrepl.core.formats.limits.Limits`.

Only then does ``torch.load(weights_only=True)`` build the real tensors (a second, independent
allow-list). :class:`PickleRefused` carries the reason; ``hostile`` says whether the file reached for
something no tensor file needs (versus merely being damaged).
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from sdrepl.core.formats.limits import Limits


class PickleRefused(Exception):
    """The file is refused before loading; ``reason`` says what was found, ``hostile`` whether it is an attack
    signature (a callable, an allocation, a foreign opcode) rather than damage."""

    def __init__(self, reason: str, *, hostile: bool = True) -> None:
        self.reason = reason
        self.hostile = hostile
        super().__init__(reason)


class LegacyModule:
    """Stand-in for a pickled ``nn.Module`` (old ``nn.ParameterDict`` files): its attributes as data, no code."""

    def __repr__(self) -> str:
        return "LegacyModule()"


@dataclass(frozen=True)
class StorageType:
    """What a ``torch.FloatStorage``-style global stands for: a dtype and its element size."""

    dtype: str
    itemsize: int


@dataclass(frozen=True)
class StorageRef:
    """A storage a pickle refers to: its key (``data/<key>`` in a zip), type and declared element count."""

    key: str
    type: StorageType
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.type.itemsize


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as ``_rebuild_tensor_v2`` would build it: a view of ``storage``, not yet materialised."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Inspection:
    """What :func:`inspect_torch_file` found: the object graph (tensors as specs) and whether the legacy
    ``ParameterDict`` stand-in is needed to load it."""

    obj: object
    tensors: list[TensorSpec] = field(default_factory=list)
    storages: dict[str, StorageRef] = field(default_factory=dict)
    needs_legacy_module: bool = False


_STORAGE_TYPES = {
    "FloatStorage": StorageType("float32", 4), "HalfStorage": StorageType("float16", 2),
    "BFloat16Storage": StorageType("bfloat16", 2), "DoubleStorage": StorageType("float64", 8),
    "LongStorage": StorageType("int64", 8), "IntStorage": StorageType("int32", 4),
    "ShortStorage": StorageType("int16", 2), "CharStorage": StorageType("int8", 1),
    "ByteStorage": StorageType("uint8", 1), "BoolStorage": StorageType("bool", 1),
}
_LEGACY_MODULE = ("torch.nn.modules.container", "ParameterDict")


def _spec(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> TensorSpec:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: checks the arguments' types, allocates nothing."""
    if not isinstance(storage, StorageRef):
        raise PickleRefused("a tensor is rebuilt from something that is not a storage", hostile=True)
    ints = (offset, *tuple(size), *tuple(stride))
    if not all(type(v) is int and v >= 0 for v in ints) or len(size) != len(stride) or len(size) > 8:
        raise PickleRefused(f"a tensor has an impossible shape {tuple(size)!r} / stride {tuple(stride)!r} / offset "
                            f"{offset!r}", hostile=True)
    return TensorSpec(storage, offset, tuple(size), tuple(stride))


def _parameter(data, requires_grad=False, hooks=None, state=None) -> object:
    """Stand-in for ``torch._utils._rebuild_parameter``: a Parameter is its data."""
    return data


#: Every global a torch.save'd embedding or LoRA names, and the inert object the inspector uses for it.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("torch._utils", "_rebuild_tensor_v2"): _spec,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    _LEGACY_MODULE: LegacyModule,
    **{("torch", name): kind for name, kind in _STORAGE_TYPES.items()},
}

#: The opcodes pickle protocols 2 and 3 use for the objects above (what torch.save writes).
_ALLOWED_OPS = frozenset({
    "PROTO", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "SETITEM", "SETITEMS", "APPEND", "APPENDS",
    "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET",
    "BINUNICODE", "SHORT_BINSTRING", "BINSTRING", "BINBYTES", "SHORT_BINBYTES",
    "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "NEWTRUE", "NEWFALSE", "NONE",
    "GLOBAL", "REDUCE", "BINPERSID", "NEWOBJ", "BUILD",
})
#: Opcodes that build a new container or call something (the costly ones, counted against the limit).
_BUILDING_OPS = frozenset({"EMPTY_DICT", "EMPTY_LIST", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "REDUCE", "NEWOBJ",
                           "DICT", "LIST", "INST", "OBJ", "NEWOBJ_EX", "FROZENSET", "EMPTY_SET"})
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                         "SHORT_BINSTRING"})
_WHY_OP = {
    "INST": "the INST opcode (pickle protocol 0/1 instantiating a class by name)",
    "OBJ": "the OBJ opcode (pickle protocol 1 instantiating a class)",
    "NEWOBJ_EX": "the NEWOBJ_EX opcode (protocol 4 object construction)",
    "EXT1": "an extension-registry opcode (EXT1)", "EXT2": "an extension-registry opcode (EXT2)",
    "EXT4": "an extension-registry opcode (EXT4)",
    "PERSID": "a text persistent id (PERSID, protocol 0)",
    "BYTEARRAY8": "a bytearray (protocol 5 BYTEARRAY8)",
    "NEXT_BUFFER": "an out-of-band buffer (protocol 5)", "READONLY_BUFFER": "an out-of-band buffer (protocol 5)",
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_ZIP_RECORDS = frozenset({"version", ".format_version", ".storage_alignment", "byteorder",
                          ".data/serialization_id", ".data/version"})
_STORAGE_NAME = re.compile(r"data/\d{1,9}")


def never_needs(kind: str) -> str:
    return f"which {'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind} never needs"


# ---------------------------------------------------------------- step 2: opcodes


def _global_name(arg: str) -> tuple[str, str]:
    module, _, name = arg.partition(" ")
    return module, name


def scan_opcodes(stream: bytes, limits: Limits, *, what: str = "the pickle") -> set[tuple[str, str]]:
    """Check a pickle's opcodes without building any object; return the globals it names.

    Raises :class:`PickleRefused`: a global off the allow-list first (the most telling finding), then a
    protocol or opcode torch.save never writes, a memo index that does not exist, too many opcodes.
    """
    if len(stream) > limits.max_pickle_bytes:
        raise PickleRefused(f"{what} is {len(stream)} bytes, more than a {limits.kind} file's pickle ever needs "
                            f"({limits.max_pickle_bytes})")
    protocol: int | None = None
    foreign: str | None = None
    names: set[tuple[str, str]] = set()
    strings: list[str] = []  # recent string pushes, for STACK_GLOBAL's operands
    memo: dict[int, str] = {}
    puts = count = built = 0
    saw_inst = False
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(stream)):
            count += 1
            name = op.name
            if count == 1:
                protocol = arg if name == "PROTO" else 0
            if name in ("GLOBAL", "INST"):
                names.add(_global_name(arg))
                saw_inst = saw_inst or name == "INST"
            elif name == "STACK_GLOBAL":
                names.add((strings[-2], strings[-1]) if len(strings) >= 2 else ("?", "?"))
            elif name in _STRING_OPS:
                strings.append(arg if isinstance(arg, str) else repr(arg))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
                index = puts if name == "MEMOIZE" else arg
                puts += 1
                if not isinstance(index, int) or index > count:
                    raise PickleRefused(f"{what} stores into memo slot {index} after {count} opcodes (a pickle "
                                        "trick that makes the unpickler allocate that many slots)")
                if strings:
                    memo[index] = strings[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
                strings.append(memo[arg])
            if name not in _ALLOWED_OPS and foreign is None:
                foreign = name
            if name in _BUILDING_OPS:
                built += 1
                if built > limits.max_pickle_objects:
                    raise PickleRefused(f"{what} builds more than {limits.max_pickle_objects:,} containers and calls, "
                                        f"more than any {limits.kind} file needs (an allocation trick)")
            if name == "STOP":
                break
    except PickleRefused:
        raise
    except (ValueError, EOFError, UnicodeDecodeError, struct.error, IndexError) as exc:
        raise PickleRefused(f"{what} is truncated or corrupt ({exc})", hostile=False) from None
    refused = sorted(n for n in names if n not in ALLOWED_GLOBALS)
    if refused:
        module, name = refused[0]
        via = " (through the INST opcode)" if saw_inst else ""
        raise PickleRefused(f"it refers to {module}.{name}{via}, {never_needs(limits.kind)}")
    if protocol not in (2, 3):
        shown = "0 or 1" if protocol == 0 else str(protocol)
        raise PickleRefused(f"{what} uses pickle protocol {shown}; torch.save writes protocol 2 and the safe loader "
                            "reads only that (re-save it with torch.save's defaults, or as .safetensors)")
    if foreign is not None:
        raise PickleRefused(f"{what} uses {_WHY_OP.get(foreign, f'the pickle opcode {foreign}')}, which torch.save "
                            "never writes")
    return names


# ---------------------------------------------------------------- step 3: the restricted unpickler


class _Inspector(pickle.Unpickler):
    """Unpickles with inert stand-ins only (see :data:`ALLOWED_GLOBALS`); records every storage."""

    def __init__(self, stream: bytes, limits: Limits) -> None:
        super().__init__(io.BytesIO(stream))
        self.limits = limits
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> object:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise PickleRefused(f"it refers to {module}.{name}, {never_needs(self.limits.kind)}") from None

    def persistent_load(self, pid: object) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise PickleRefused(f"it holds a persistent reference {type(pid).__name__} that is not a torch storage")
        kind, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(kind, StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise PickleRefused("it holds a storage reference with impossible fields", hostile=False)
        if len(pid) == 6 and pid[5] is not None:
            raise PickleRefused("it holds a legacy storage view, which embedding files never use")
        if numel > self.limits.max_total_values:
            raise PickleRefused(f"it declares a storage of {numel:,} values, far more than {_limit(self.limits)}")
        ref = StorageRef(key, kind, numel)
        if self.storages.setdefault(key, ref) != ref:
            raise PickleRefused(f"it declares storage {key!r} twice with different sizes")
        return ref


def _limit(limits: Limits) -> str:
    return f"any {limits.kind} holds ({limits.max_total_values:,} values at most)"


def _unpickle(stream: bytes, limits: Limits) -> tuple[object, dict[str, StorageRef]]:
    inspector = _Inspector(stream, limits)
    try:
        obj = inspector.load()
    except PickleRefused:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError, RecursionError) as exc:
        raise PickleRefused(f"the pickle is truncated or corrupt ({type(exc).__name__}: {exc})", hostile=False) from None
    return obj, inspector.storages


def _walk(obj: object) -> Iterator[object]:
    """Every object reachable from ``obj`` through containers and stand-in modules, each once."""
    seen: set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        if isinstance(item, (LegacyModule, collections.OrderedDict)):  # attributes set by BUILD
            stack.extend(vars(item).values())


# ---------------------------------------------------------------- step 4: sizes


def _check_sizes(tensors: list[TensorSpec], storages: dict[str, StorageRef], present: int, limits: Limits) -> None:
    """Tensors within the limits and within their storages; storages no larger than the bytes ``present``."""
    if len(tensors) > limits.max_tensors:
        raise PickleRefused(
            f"it holds {len(tensors)} tensors, more than {'an' if limits.kind[0] in 'aeiou' else 'a'} {limits.kind} "
            f"ever has ({limits.max_tensors}): this looks like a model or LoRA", hostile=False)
    stored = sum(ref.nbytes for ref in storages.values())
    if stored > present:
        raise PickleRefused(f"its storages declare {stored:,} bytes but the file holds only {present:,}: it is "
                            "truncated, or declares sizes to make the loader allocate memory")
    total = 0
    for spec in tensors:
        values = spec.numel
        shape = "x".join(map(str, spec.shape)) or "scalar"
        if values > limits.max_tensor_values:
            view = ""
            if values > spec.storage.numel:
                view = f", viewed from a storage of {spec.storage.numel:,} values with stride {list(spec.stride)}"
            raise PickleRefused(f"it holds a [{shape}] tensor ({values:,} values{view}), far more than "
                                f"{_limit(limits)}")
        if values and spec.offset + sum((s - 1) * st for s, st in zip(spec.shape, spec.stride, strict=True)) >= spec.storage.numel:
            raise PickleRefused(f"a [{shape}] tensor reaches past the end of its storage", hostile=False)
        total += values
    if total > limits.max_total_values:
        raise PickleRefused(f"its tensors hold {total:,} values in all, far more than {_limit(limits)}")


# ---------------------------------------------------------------- step 1: containers, and the whole


def _zip_members(data: bytes, limits: Limits) -> tuple[str, bytes, dict[str, int]]:
    """(top folder, data.pkl bytes, storage key -> declared bytes) of a torch zip, after the member checks."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, struct.error, OverflowError,
            NotImplementedError) as exc:  # NotImplementedError: a zip version or feature zipfile lacks
        raise PickleRefused(f"the zip archive is truncated or corrupt ({exc})", hostile=False) from None
    if not infos:
        raise PickleRefused("the zip archive is empty", hostile=False)
    if len(infos) > limits.max_zip_members:
        raise PickleRefused(f"the zip archive has {len(infos)} members, more than a {limits.kind} file ever has "
                            f"({limits.max_zip_members})", hostile=False)
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise PickleRefused(f"the zip archive holds two members named {dup!r} (a trick that shows checkers one "
                            "file and the loader another)")
    top = names[0].split("/", 1)[0]
    if any(n.endswith("/code/") or "/code/" in n or n.endswith("constants.pkl") for n in names):
        raise PickleRefused("it is a TorchScript archive (torch.jit.save): it holds a program, not just tensors")
    storages: dict[str, int] = {}
    pickle_info = None
    for info in infos:
        rest = info.filename[len(top) + 1:] if info.filename.startswith(top + "/") else None
        known = rest == "data.pkl" or rest in _ZIP_RECORDS or (rest is not None and _STORAGE_NAME.fullmatch(rest))
        if known and info.compress_type != zipfile.ZIP_STORED:
            what = "storage" if rest.startswith("data/") else "member"
            raise PickleRefused(f"its {what} {info.filename!r} is compressed, which torch.save never does (a "
                                f"compressed member can declare {info.file_size:,} bytes in a tiny file)")
        if rest == "data.pkl":
            pickle_info = info
        elif rest is not None and _STORAGE_NAME.fullmatch(rest):
            storages[rest[5:]] = info.file_size
        elif rest in _ZIP_RECORDS:
            if info.file_size > 4096:
                raise PickleRefused(f"its record {info.filename!r} declares {info.file_size:,} bytes")
        else:
            kind = ("a second pickle" if info.filename.endswith(".pkl") else
                    "a numpy array" if info.filename.endswith(".npy") else "an unexpected member")
            raise PickleRefused(f"the zip archive holds {kind} {info.filename!r}, which torch.save never writes")
    if pickle_info is None:
        raise PickleRefused(f"the zip archive has no {top}/data.pkl: it is not a torch.save file", hostile=False)
    if pickle_info.file_size > limits.max_pickle_bytes:
        raise PickleRefused(f"its data.pkl declares {pickle_info.file_size:,} bytes, more than a {limits.kind} file's "
                            f"pickle ever needs ({limits.max_pickle_bytes:,})")
    try:
        stream = archive.read(pickle_info)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, OverflowError, struct.error) as exc:
        raise PickleRefused(f"its data.pkl cannot be read ({exc})", hostile=False) from None
    return top, stream, storages


def _next_stream(data: bytes, start: int, limits: Limits) -> bytes:
    """The pickle that starts at ``start`` (up to and including its STOP opcode)."""
    window = io.BytesIO(data[start:start + limits.max_pickle_bytes + 1])
    try:
        for op, _arg, at in pickletools.genops(window):
            if op.name == "STOP":
                return data[start:start + at + 1]
    except (ValueError, EOFError, UnicodeDecodeError, struct.error, IndexError):
        pass
    # Not cut cleanly: let the opcode scan say what is wrong (a refused global, a size, damage).
    scan_opcodes(data[start:start + limits.max_pickle_bytes + 1], limits)
    raise PickleRefused("the file ends inside a pickle: it is truncated or corrupt", hostile=False)


def _legacy(data: bytes, limits: Limits) -> tuple[object, dict[str, StorageRef], set[tuple[str, str]], int]:
    """Inspect the five pickles of a pre-1.6 torch file (or a plain pickle, refused after its scan);
    return the main object, its storages, the globals named and the bytes left for the raw storages."""
    names: set[tuple[str, str]] = set()
    pos = 0
    obj: object = None
    storages: dict[str, StorageRef] = {}
    for index in range(5):
        stream = _next_stream(data, pos, limits)
        pos += len(stream)
        names |= scan_opcodes(stream, limits, what="its main pickle" if index == 3 else "the pickle")
        if index == 0:
            magic, _ = _unpickle(stream, limits)
            if magic != _LEGACY_MAGIC:
                raise PickleRefused("it is a plain pickle, not a torch.save file (no torch magic number)")
        elif index == 3:
            obj, storages = _unpickle(stream, limits)
    return obj, storages, names, len(data) - pos


def inspect_torch_file(data: bytes, limits: Limits) -> Inspection:
    """Run steps 1-4 of the module docstring on the bytes of a torch file; raise :class:`PickleRefused`."""
    if data[:4] == b"PK\x03\x04":
        _top, stream, declared = _zip_members(data, limits)
        names = scan_opcodes(stream, limits, what="its data.pkl")
        obj, storages = _unpickle(stream, limits)
        for key, ref in storages.items():
            if key not in declared:
                raise PickleRefused(f"its pickle refers to storage {key!r}, which the archive does not hold",
                                    hostile=False)
            if declared[key] < ref.nbytes:
                raise PickleRefused(f"storage {key!r} declares {ref.numel:,} values but its member holds only "
                                    f"{declared[key]:,} bytes: the file is truncated or damaged", hostile=False)
        present = sum(declared.values())
    else:
        obj, storages, names, present = _legacy(data, limits)
    tensors = [item for item in _walk(obj) if isinstance(item, TensorSpec)]
    _check_sizes(tensors, storages, present, limits)
    return Inspection(obj, tensors, storages, needs_legacy_module=_LEGACY_MODULE in names)
