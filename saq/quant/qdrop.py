"""QDrop's random choice of the elements that stay full precision in a training step."""

from __future__ import annotations

import torch

from saq.config.schema import QDropDraws

DRAWS = tuple(d.value for d in QDropDraws)  # the choices of ptq.recon.qdrop_draws
_BITS_PER_DRAW = 16  # random_(0, 2^16): 16 unbiased bits from each 32-bit draw of the generator


def keep_fp_mask(like: torch.Tensor, prob: float, draws: str = "bits") -> torch.Tensor:
    """A bool tensor of ``like``'s shape: each element independently True (keep it FP) with probability ``prob``.

    ``draws``:

    * ``bits``: for ``prob`` = 0.5 (the value of every QDrop recipe), one random bit per element, 16 of
      them from each draw of the generator. ATen's CPU generator is serial, about 10 ns a draw, so one
      draw per element cost 7-15% of a reconstruction step; this takes a sixth of the time. Any other
      ``prob`` falls back to ``uniform`` (the same distribution either way).
    * ``uniform``: one float draw per element, compared with ``prob``: the draws of runs made before
      ``bits`` existed, to reproduce them bit for bit.
    """
    if draws not in DRAWS:
        raise ValueError(f"QDrop draws={draws!r}: choose one of {list(DRAWS)}")
    if draws == "uniform" or prob != 0.5:
        return torch.rand_like(like) < prob
    n = like.numel()
    words = torch.empty((n + _BITS_PER_DRAW - 1) // _BITS_PER_DRAW, dtype=torch.int32, device=like.device)
    words.random_(0, 1 << _BITS_PER_DRAW)
    # Two octets per word by arithmetic (no dependence on the machine's byte order), then 8 bits per octet.
    octets = torch.stack((words & 255, words >> 8), dim=1).to(torch.uint8).view(-1, 1)
    bit_values = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=like.device)
    return octets.bitwise_and(bit_values).view(-1)[:n].view(like.shape).bool()
