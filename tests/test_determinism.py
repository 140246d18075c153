"""Two independent CLI runs with the same seed give the same numbers and the same quantized weights."""

import pytest

from recon_cli import checkpoint_tensors, comparable_metrics, predictions, run_ptq, tensor_differences


@pytest.mark.slow
def test_two_runs_with_one_seed_are_identical(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run_ptq(first, tmp_path / "cache_first")
    run_ptq(second, tmp_path / "cache_second")

    a, b = comparable_metrics(first), comparable_metrics(second)
    assert a["deployable"] is True and len(a["stages"]["reconstruct"]) == 6  # the recipe really reconstructed
    assert 0.0 < a["quantized"]["mask_AP"] < 100.0 and a["quantized"]["fidelity_mIoU"] < 1.0
    assert a == b
    assert predictions(first) == predictions(second)  # every prompt's box, score and mask

    tensors = checkpoint_tensors(first / "quantized.pt")
    assert len(tensors) > 100 and any(k.endswith("weight_quantizer.scale") for k in tensors)
    assert tensor_differences(tensors, checkpoint_tensors(second / "quantized.pt")) == []
