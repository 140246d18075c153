"""QDrop's choice of FP elements: the distribution of the fast bit draws, and the old stream kept."""

import pytest
import torch

from saq.engine.reconstruction import recon_settings
from saq.quant.qdrop import keep_fp_mask


def test_bit_draws_are_fair_independent_coins():
    torch.manual_seed(0)
    like = torch.empty(1000, 1003)  # 1,003,000 elements: not a multiple of the 16 bits of a draw
    mask = keep_fp_mask(like, 0.5, "bits")
    assert mask.shape == like.shape and mask.dtype == torch.bool
    flat = mask.view(-1).float()
    # Each of the 16 bit positions of a draw, and neighbours, are fair and uncorrelated: one bad
    # position (a constant byte, a byte-order mistake) moves its mean by 0.5, far past 5 sigma.
    sigma = 0.5 / (flat.numel() / 16) ** 0.5
    per_position = flat[: flat.numel() // 16 * 16].view(-1, 16).mean(0)
    assert (per_position - 0.5).abs().max() < 5 * sigma, per_position
    agree = (mask.view(-1)[1:] == mask.view(-1)[:-1]).float().mean()
    assert abs(float(agree) - 0.5) < 5 * 0.5 / flat.numel() ** 0.5


def test_bit_draws_follow_the_seed_and_differ_between_calls():
    like = torch.empty(37, 5)
    torch.manual_seed(3)
    first, second = keep_fp_mask(like, 0.5), keep_fp_mask(like, 0.5)
    torch.manual_seed(3)
    assert torch.equal(keep_fp_mask(like, 0.5), first)
    assert not torch.equal(first, second)


def test_uniform_draws_are_the_stream_of_earlier_runs_and_other_probabilities_use_it():
    like = torch.empty(64, 9)
    for prob, draws in ((0.5, "uniform"), (0.3, "bits"), (0.3, "uniform")):
        torch.manual_seed(5)
        got = keep_fp_mask(like, prob, draws)
        torch.manual_seed(5)
        assert torch.equal(got, torch.rand_like(like) < prob)


def test_unknown_draws_name_the_choices():
    with pytest.raises(ValueError, match=r"'bits', 'uniform'"):
        keep_fp_mask(torch.empty(4), 0.5, "dice")
    with pytest.raises(ValueError, match="ptq.recon.qdrop_draws='dice'.*bits"):
        recon_settings({"qdrop_draws": "dice"})
