"""How many pictures of a ``--n N`` request run as one batch, and the retry when a batch does not fit.

Why: on a GPU one batch of N runs far faster than N batches of one, but a batch's activations grow with
N and the picture size. The first guess comes from the device's free memory and a per-picture estimate;
if the device still runs out of memory, the batch is halved and run again (the noise is a function of the
seeds, so the pictures are the same whatever the split).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")

#: Activation bytes per latent position per picture (a CFG pair) in a 2-byte dtype: SD 1.5 at 512 px
#: (4096 positions) peaks near 0.6 GiB a picture with SDPA, SDXL's wider UNet at 1024 px near 2.5 GiB.
BYTES_PER_POSITION = {"sd1": 160_000, "sd2": 160_000, "sdxl": 170_000}
#: Keep this share of the free memory for the VAE decode and the allocator's slack.
HEADROOM = 0.7


def pictures_per_batch(model: Any, width: int, height: int, n: int) -> int:
    """The largest batch (at most ``n``) the device is expected to hold; all ``n`` off CUDA."""
    device = getattr(model, "device", torch.device("cpu"))
    if device.type != "cuda" or n <= 1:
        return max(1, n)
    free, _total = torch.cuda.mem_get_info(device)
    positions = (width // 8) * (height // 8)
    size = torch.finfo(model.dtype).bits // 8
    per_picture = BYTES_PER_POSITION.get(getattr(model, "family", "sd1"), 170_000) * positions * size / 2
    return max(1, min(n, int(free * HEADROOM // per_picture)))


def _out_of_memory(error: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return bool(oom is not None and isinstance(error, oom))


def in_batches(seeds: Sequence[int], size: int, run: Callable[[list[int]], T]) -> Iterator[tuple[list[int], T]]:
    """``run(batch_seeds)`` over ``seeds`` in batches of ``size``, halving a batch that runs out of device
    memory (a batch of one that does not fit raises)."""
    start = 0
    while start < len(seeds):
        batch = list(seeds[start:start + size])
        try:
            result = run(batch)
        except Exception as error:
            if not _out_of_memory(error) or size == 1:
                raise
            del error
            torch.cuda.empty_cache()
            size = max(1, size // 2)
            continue
        yield batch, result
        start += len(batch)
