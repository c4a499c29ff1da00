"""The trained vectors as one tensor: ``[N, D]`` for one text encoder, ``[N, 768 + 1280]`` for an SDXL pair.

Training an SDXL pair means training two ``[N, D]`` sets (``clip_l`` for encoder 1, ``clip_g`` for encoder
2) on one loss. They are kept side by side in one parameter, so the optimizer, gradient clipping
(``norm`` over both, as one parameter group would be), the NaN guard, checkpoints and resume work the
same for every family. AdamW is elementwise, so this is the same optimisation as two parameters. Only
where vectors enter conditioning or a file are they split, by the model's encoder widths (in order:
``clip_l`` then ``clip_g``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def split_vectors(vectors: torch.Tensor, widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """``[N, sum(widths)]`` -> ``{key: [N, width]}`` in the order of ``widths`` (views, autograd kept)."""
    if vectors.shape[-1] != sum(widths.values()):
        raise ValueError(f"vectors are {vectors.shape[-1]} wide, the encoders {dict(widths)}")
    out, start = {}, 0
    for key, width in widths.items():
        out[key] = vectors[..., start:start + width]
        start += width
    return out


def join_vectors(parts: Mapping[str, torch.Tensor], widths: Mapping[str, int]) -> torch.Tensor:
    """``{key: [N, width]}`` -> ``[N, sum(widths)]`` float32 on the CPU; ValueError naming what does not fit."""
    if set(parts) != set(widths):
        raise ValueError(f"vectors for encoders {sorted(parts)}, but the model has {sorted(widths)}")
    counts = {int(parts[k].shape[0]) for k in widths}
    if len(counts) != 1:
        raise ValueError(f"the encoders' vector counts differ: {({k: int(parts[k].shape[0]) for k in widths})}")
    for key, width in widths.items():
        if parts[key].shape[-1] != width:
            raise ValueError(f"{key} vectors are {parts[key].shape[-1]} wide, the model's {key} encoder {width}")
    return torch.cat([parts[k].detach().to("cpu", torch.float32) for k in widths], dim=-1).clone()
