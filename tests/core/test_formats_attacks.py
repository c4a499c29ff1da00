"""The attack corpus (tests/attack_corpus.py): each file refused with what was found, no code run, no memory
spent; files swapped for FIFOs and devices never block; legitimate torch.save variants still load."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from attack_corpus import CODE, CORPUS, FORMAT, MEMORY, Attack, a1111_dict, saved
from fixture_paths import A1111

from sdrepl.core.embedding import CLIP_G, CLIP_L, SINGLE
from sdrepl.core.errors import EmbeddingError
from sdrepl.core.formats import NotAnEmbedding, read_embedding, write_png_card
from sdrepl.core.safe_open import UnsafeFile, read_regular_file

ROOT = Path(__file__).resolve().parents[2]


def _write(attack: Attack, folder: Path) -> tuple[Path, Path]:
    marker = folder / f"ran-{attack.name}"
    path = folder / attack.filename
    path.write_bytes(attack.build(marker))
    return path, marker


@pytest.mark.parametrize("attack", CORPUS, ids=[a.name for a in CORPUS])
def test_attack_is_refused_with_what_was_found(tmp_path: Path, attack: Attack) -> None:
    path, marker = _write(attack, tmp_path)
    with pytest.raises(EmbeddingError) as info:
        read_embedding(path)
    assert isinstance(info.value, NotAnEmbedding) == attack.silent
    assert attack.reason in info.value.reason
    assert "download it again" not in info.value.reason  # the same file again would be refused again
    assert not marker.exists()


@pytest.mark.parametrize("attack", [a for a in CODE if a.live], ids=[a.name for a in CODE if a.live])
def test_code_payloads_are_live(tmp_path: Path, attack: Attack) -> None:
    """The corpus is not toothless: an unsafe unpickler (never used by sdrepl) runs each payload."""
    marker = tmp_path / "ran"
    data = attack.build(marker)
    try:
        pickle.loads(data)
    except Exception:
        pass
    assert marker.exists()


@pytest.mark.parametrize("attack", FORMAT[:3], ids=[a.name for a in FORMAT[:3]])
def test_refusals_of_foreign_pickles_do_not_blame_corruption(tmp_path: Path, attack: Attack) -> None:
    path, _ = _write(attack, tmp_path)
    with pytest.raises(EmbeddingError) as info:
        read_embedding(path)
    assert "corrupt" not in info.value.reason and "truncated" not in info.value.reason


_MEASURE = r"""
import re, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from sdrepl.core.formats import read_embedding
from sdrepl.core.errors import EmbeddingError

def kib(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

read_embedding(Path(sys.argv[2]))  # warm up torch, Pillow and the caches
for name in sys.argv[3:]:
    before = kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    try:
        read_embedding(Path(name))
        outcome = "loaded"
    except EmbeddingError as exc:
        outcome = type(exc).__name__
    print(name, (kib("VmHWM") - before) // 1024, outcome, flush=True)
"""


@pytest.mark.slow
def test_memory_attacks_cost_less_than_50_mb(tmp_path: Path) -> None:
    """Peak RSS growth of a fresh process reading each memory attack (and each other corpus file)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    paths = []
    for index, attack in enumerate(CORPUS):
        folder = tmp_path / f"{index}"
        folder.mkdir()
        paths.append(str(_write(attack, folder)[0]))
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(ROOT / "tests"), str(A1111 / "bad-artist.pt"), *paths],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    growth = {line.split()[0]: int(line.split()[1]) for line in result.stdout.splitlines()}
    names = {str(p): a.name for p, a in zip(paths, CORPUS, strict=True)}
    over = {names[p]: mb for p, mb in growth.items() if mb >= 50}
    assert len(growth) == len(CORPUS) and not over, f"peak RSS growth in MB: {over}"
    assert {names[p] for p in growth} >= {a.name for a in MEMORY}


# ---------------------------------------------------------------- what must still load


@pytest.mark.parametrize(
    ("name", "build"),
    [
        ("protocol-3", lambda: saved(a1111_dict(torch.ones(2, 768)), pickle_protocol=3)),
        ("legacy-format", lambda: saved(a1111_dict(torch.ones(2, 768)), _use_new_zipfile_serialization=False)),
        ("parameter-dict", lambda: saved({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.ones(2, 768))}),
                                          "name": "x"})),
        ("parameter", lambda: saved({"emb_params": torch.nn.Parameter(torch.ones(3, 1024))})),
        ("half", lambda: saved({"<x>": torch.ones(768, dtype=torch.float16)})),
        ("bfloat16", lambda: saved({"<x>": torch.ones(4, 768, dtype=torch.bfloat16)})),
        ("largest-sdxl-pair", lambda: saved({CLIP_L: torch.ones(75, 768), CLIP_G: torch.ones(75, 1280)})),
        ("view-of-a-slice", lambda: saved({"<x>": torch.ones(8, 768)[2:5]})),
    ],
)
def test_legitimate_torch_files_still_load(tmp_path: Path, name: str, build) -> None:
    path = tmp_path / f"{name}.pt"
    path.write_bytes(build())
    data = read_embedding(path)
    assert all(float(t.abs().sum()) > 0 for t in data.vectors.values())


def test_pt_that_is_really_a_png_is_read_as_a_card(tmp_path: Path) -> None:
    card = write_png_card(tmp_path / "card.png", {SINGLE: torch.ones(2, 768)}, name="card", step=3, preview=None)
    disguised = tmp_path / "disguised.pt"
    disguised.write_bytes(card.read_bytes())
    data = read_embedding(disguised)
    assert data.format == "png-text/a1111" and data.inner_name == "card"


def test_reason_never_shows_the_bytes_a_symlink_leads_to(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOKEN=hunter2-very-secret\n")
    for suffix in (".pt", ".png", ".safetensors"):
        link = tmp_path / f"link{suffix}"
        link.symlink_to(secret)
        with pytest.raises(EmbeddingError) as info:
            read_embedding(link)
        reason = info.value.reason
        assert "hunter2" not in reason and "TOKEN" not in reason
        assert b"TOKEN".hex() not in reason.replace(" ", "") and "54 4f" not in reason.lower()


# ---------------------------------------------------------------- FIFOs, devices, swaps


def _finishes(fn, timeout: float = 10.0) -> BaseException | None:
    """Run ``fn`` in a thread; fail if it is still blocked after ``timeout``; return what it raised."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        # unblock the reader so the test process can exit, then fail
        pytest.fail("the reader blocked on a FIFO")
    return outcome[0]


def test_fifo_named_like_an_embedding_is_skipped_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "swapped.pt"
    os.mkfifo(fifo)
    error = _finishes(lambda: read_embedding(fifo))
    assert isinstance(error, NotAnEmbedding) and "FIFO" in error.reason


def test_file_swapped_for_a_fifo_after_stat_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "swapped.pt"
    path.write_bytes(b"x")
    regular = os.stat(path)
    path.unlink()
    os.mkfifo(path)
    error = _finishes(lambda: read_regular_file(path, 1024, st=regular))
    assert isinstance(error, UnsafeFile) and "FIFO" in error.reason


def test_device_linked_as_an_embedding_is_skipped(tmp_path: Path) -> None:
    link = tmp_path / "zero.pt"
    link.symlink_to("/dev/zero")
    error = _finishes(lambda: read_embedding(link))
    assert isinstance(error, NotAnEmbedding) and "character device" in error.reason


def test_reads_stop_at_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(2048))
    with pytest.raises(UnsafeFile) as info:
        read_regular_file(path, 1024)
    assert info.value.too_large
    assert read_regular_file(path, 4096)[0] == bytes(2048)


def test_nofollow_refuses_a_link(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"data")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert read_regular_file(link, 100)[0] == b"data"
    with pytest.raises((UnsafeFile, OSError)):
        read_regular_file(link, 100, follow_symlinks=False)


def test_inspection_leaves_nothing_running_in_memory(tmp_path: Path) -> None:
    """A refused legacy pickle is refused by the opcode scan before the unpickler builds anything."""
    from sdrepl.core.formats.limits import EMBEDDING_LIMITS
    from sdrepl.core.formats.pickle_scan import PickleRefused, inspect_torch_file

    buffer = io.BytesIO()
    pickle.dump({"name": "x"}, buffer, protocol=2)
    with pytest.raises(PickleRefused, match="plain pickle"):
        inspect_torch_file(buffer.getvalue(), EMBEDDING_LIMITS)


def test_library_read_of_a_file_swapped_for_a_fifo_does_not_block(tmp_path: Path) -> None:
    """The library stats, then reads with that stat: a FIFO swapped in between must not block the read."""
    from sdrepl.core.formats import read_file_bytes

    path = tmp_path / "swapped.pt"
    path.write_bytes(b"x")
    regular = os.stat(path)
    path.unlink()
    os.mkfifo(path)
    error = _finishes(lambda: read_file_bytes(path, regular))
    assert isinstance(error, NotAnEmbedding) and "FIFO" in error.reason


def test_open_regular_file_reads_part_of_a_file_and_refuses_fifos(tmp_path: Path) -> None:
    from sdrepl.core.safe_open import open_regular_file

    path = tmp_path / "x.safetensors"
    path.write_bytes(b"0123456789")
    with open_regular_file(path, 100) as (fh, st):
        assert fh.read(4) == b"0123" and st.st_size == 10
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)

    def attempt() -> None:
        with open_regular_file(fifo, 100):
            pass

    assert isinstance(_finishes(attempt), UnsafeFile)
