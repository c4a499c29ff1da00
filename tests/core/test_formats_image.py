"""A1111 image cards: text chunk, pixel data cube (text stripped), lossless WEBP, previews, A1111's LCG."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from sdrepl.core.embedding import SINGLE
from sdrepl.core.errors import EmbeddingError
from sdrepl.core.formats import NotAnEmbedding, decide_trigger, read_embedding, write_png_card
from sdrepl.core.formats.image_card import TEXT_KEY, _lcg_nibbles


def vectors(count: int = 4) -> torch.Tensor:
    return torch.randn(count, 768, generator=torch.Generator().manual_seed(count))


def strip_text(src: Path, dst: Path) -> None:
    """What an image host does: keep the pixels, drop every text chunk."""
    with Image.open(src) as image:
        Image.frombytes("RGB", image.size, image.convert("RGB").tobytes()).save(dst)


def test_png_card_reads_back_from_text_chunk(tmp_path: Path) -> None:
    original = vectors()
    path = write_png_card(tmp_path / "card-500.png", {SINGLE: original}, name="mystyle", step=500, preview=None)
    with Image.open(path) as image:
        assert TEXT_KEY in image.text
    data = read_embedding(path)
    assert data.format == "png-text/a1111"
    assert torch.equal(data.vectors[SINGLE], original)
    assert decide_trigger(path, data) == "mystyle" and data.step == 500


def test_png_card_without_text_chunk_reads_back_from_pixels(tmp_path: Path) -> None:
    original = vectors(8)
    card = write_png_card(tmp_path / "card.png", {SINGLE: original}, name="pixels", step=None, preview=None)
    stripped = tmp_path / "stripped.png"
    strip_text(card, stripped)
    data = read_embedding(stripped)
    assert data.format == "png-pixels/a1111"
    assert torch.equal(data.vectors[SINGLE], original)
    assert decide_trigger(stripped, data) == "pixels"


def test_card_around_a_given_preview(tmp_path: Path) -> None:
    preview = Image.new("RGBA", (100, 150), (250, 200, 10, 128))
    card = write_png_card(tmp_path / "c.png", {SINGLE: vectors(2)}, name="c", step=1, preview=preview)
    stripped = tmp_path / "s.png"
    strip_text(card, stripped)
    with Image.open(card) as image:
        assert image.size[1] == 150 and image.size[0] > 102
    assert torch.equal(read_embedding(stripped).vectors[SINGLE], vectors(2))


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WEBP")
def test_lossless_webp_card_reads_back_from_pixels(tmp_path: Path) -> None:
    original = vectors(3)
    path = write_png_card(tmp_path / "card.webp", {SINGLE: original}, name="webby", step=2, preview=None)
    data = read_embedding(path)
    assert data.format == "webp-pixels/a1111"
    assert torch.equal(data.vectors[SINGLE], original)


def test_ordinary_picture_is_not_an_embedding(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(1, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    with pytest.raises(NotAnEmbedding, match="carries no embedding"):
        read_embedding(path)


def test_lossy_reencoded_card_is_an_error(tmp_path: Path) -> None:
    card = write_png_card(tmp_path / "card.png", {SINGLE: vectors()}, name="x", step=1, preview=None)
    with Image.open(card) as image:
        pixels = np.asarray(image.convert("RGB")).copy()
    pixels[5:, 3:7] ^= 0x01  # damage the low-nibble block after the zlib header
    damaged = tmp_path / "damaged.png"
    Image.fromarray(pixels).save(damaged)
    with pytest.raises(EmbeddingError, match="does not decompress|incomplete|valid embedding JSON") as info:
        read_embedding(damaged)
    assert not isinstance(info.value, NotAnEmbedding)


def test_bad_text_chunk_is_an_error(tmp_path: Path) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(TEXT_KEY, "bm90IGpzb24=")  # base64 of "not json"
    path = tmp_path / "bad.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    with pytest.raises(EmbeddingError, match="valid embedding JSON"):
        read_embedding(path)


def test_truncated_card(tmp_path: Path) -> None:
    card = write_png_card(tmp_path / "card.png", {SINGLE: vectors()}, name="x", step=1, preview=None)
    cut = tmp_path / "cut.png"
    cut.write_bytes(card.read_bytes()[: card.stat().st_size // 2])
    with pytest.raises(EmbeddingError) as info:
        read_embedding(cut)
    assert not isinstance(info.value, NotAnEmbedding)


def test_lcg_matches_a1111_generator() -> None:
    def lcg(m=2**32, a=1664525, c=1013904223, seed=0):  # as in A1111's image_embedding.py
        while True:
            seed = (a * seed + c) % m
            yield seed % 255

    generator = lcg()
    reference = np.array([next(generator) for _ in range(20000)], dtype=np.uint8) & 0x0F
    assert np.array_equal(_lcg_nibbles(20000), reference)
    assert np.array_equal(_lcg_nibbles(3), reference[:3])


def test_card_png_bytes_open_in_pillow(tmp_path: Path) -> None:
    card = write_png_card(tmp_path / "card.png", {SINGLE: vectors()}, name="x", step=1, preview=None)
    Image.open(io.BytesIO(card.read_bytes())).verify()
