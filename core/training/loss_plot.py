"""Loss at a glance: a unicode sparkline for ``!train status`` and ``loss.png`` (Pillow) in the log folder.

Both downsample by averaging buckets of steps, so a 10,000-step run still reads as a curve (a raw loss
is noisy from step to step; the mean over a bucket is what a user judges a run by). The PNG draws the
bucket means of the loss (blue) over the raw values (light), the learning rate (orange, its own scale
on the right), and labels the axes; it is written atomically, so a viewer never sees half a file.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

BARS = "▁▂▃▄▅▆▇█"
#: Size of ``loss.png`` in pixels.
PLOT_SIZE = (800, 400)


def buckets(values: Sequence[float], count: int) -> list[float]:
    """``values`` averaged into at most ``count`` consecutive buckets (non-finite values left out)."""
    finite = [v for v in values if math.isfinite(v)]
    if count <= 0 or not finite:
        return []
    if len(finite) <= count:
        return list(finite)
    out = []
    for i in range(count):
        lo, hi = i * len(finite) // count, (i + 1) * len(finite) // count
        chunk = finite[lo:hi]
        out.append(sum(chunk) / len(chunk))
    return out


def sparkline(values: Sequence[float], width: int = 32) -> str:
    """One line of ``▁..█`` for ``values`` (bucket means, at most ``width`` characters; "" for none)."""
    points = buckets(values, width)
    if not points:
        return ""
    lo, hi = min(points), max(points)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return BARS[len(BARS) // 2 - 1] * len(points)
    return "".join(BARS[min(len(BARS) - 1, int((v - lo) / (hi - lo) * len(BARS)))] for v in points)


def _label(value: float) -> str:
    return f"{value:.3g}"


def loss_png(steps: Sequence[int], losses: Sequence[float], rates: Sequence[float] | None = None,
             title: str = "loss") -> bytes:
    """The PNG bytes of a loss (and learning-rate) plot over ``steps``."""
    width, height = PLOT_SIZE
    left, right, top, bottom = 70, 70, 30, 40
    image = Image.new("RGB", PLOT_SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((left, 8), title, fill="black", font=font)
    box = (left, top, width - right, height - bottom)
    draw.rectangle(box, outline="black")
    pairs = [(s, v) for s, v in zip(steps, losses, strict=True) if math.isfinite(v)]
    if not pairs:
        draw.text((left + 10, top + 10), "no loss recorded yet", fill="black", font=font)
        return _encode(image)
    s0, s1 = pairs[0][0], max(pairs[-1][0], pairs[0][0] + 1)
    values = [v for _, v in pairs]
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1e-6

    def xy(step: float, value: float, vlo: float, vhi: float) -> tuple[float, float]:
        x = box[0] + (step - s0) / (s1 - s0) * (box[2] - box[0])
        y = box[3] - (value - vlo) / (vhi - vlo) * (box[3] - box[1])
        return x, y

    draw.line([xy(s, v, lo, hi) for s, v in pairs], fill=(190, 205, 235), width=1)
    count = max(1, min(len(pairs), (box[2] - box[0]) // 4))
    means = buckets(values, count)
    mean_steps = buckets([float(s) for s, _ in pairs], count)
    if len(means) > 1:
        draw.line([xy(s, v, lo, hi) for s, v in zip(mean_steps, means, strict=True)], fill=(30, 80, 200), width=2)
    for frac in (0.0, 0.5, 1.0):  # loss scale on the left, steps below
        value = lo + frac * (hi - lo)
        y = box[3] - frac * (box[3] - box[1])
        draw.text((4, y - 6), _label(value), fill=(30, 80, 200), font=font)
        step = s0 + frac * (s1 - s0)
        draw.text((box[0] + frac * (box[2] - box[0]) - 12, box[3] + 6), str(int(step)), fill="black", font=font)
    draw.text(((box[0] + box[2]) // 2 - 12, height - 16), "step", fill="black", font=font)
    if rates:
        rate_pairs = [(s, r) for s, r in zip(steps, rates, strict=True) if math.isfinite(r)]
        if rate_pairs:
            rlo, rhi = min(r for _, r in rate_pairs), max(r for _, r in rate_pairs)
            rlo, rhi = (0.0, rhi * 1.1 or 1.0) if rhi == rlo else (rlo, rhi)
            draw.line([xy(s, r, rlo, rhi) for s, r in rate_pairs], fill=(230, 130, 20), width=1)
            draw.text((box[2] + 4, box[1] - 6), f"lr {_label(rhi)}", fill=(230, 130, 20), font=font)
            draw.text((box[2] + 4, box[3] - 6), f"lr {_label(rlo)}", fill=(230, 130, 20), font=font)
    return _encode(image)


def _encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
