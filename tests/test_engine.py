"""The engine's loops: the PCC search is a Lightning predict loop that runs in the engine's precision."""

import pytest
import torch

from helpers.rules import w4a4
from saq.engine.search import run_search, search_trainer
from saq.models import build_tiny_sam
from saq.nn import quantize_
from saq.ptq import stages
from saq.ptq.pcc import pcc_search_
from saq.utils.loggers import RunLogger


def test_a_search_runs_its_steps_in_order_and_returns_their_records():
    seen = []

    def step(key):
        seen.append((key, torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        return {"key": key}

    steps = [(0, "a", "q"), (0, "a", "k"), (1, "b", "q")]
    records = run_search(search_trainer(torch.device("cpu"), "32-true"), step, steps)
    assert records == [{"key": k} for k in steps]
    # no gradients, and no inference tensors: the ranges a search writes are trained later
    assert seen == [(k, False, False) for k in steps]


def test_a_search_trainer_refuses_an_unknown_precision():
    with pytest.raises(ValueError, match="bf17"):
        search_trainer(torch.device("cpu"), "bf17")


def test_pcc_stage_passes_the_engine_precision(monkeypatch, tmp_path):
    seen = {}

    class FakeResult:
        records = []

        def to_json(self):
            return {}

        def table_rows(self):
            return [{"module": "m"}]

    def fake_search(model, items, **kwargs):
        seen.update(kwargs)
        return FakeResult()

    import saq.ptq.pcc as pcc
    import saq.ptq.pcc_plots as pcc_plots

    monkeypatch.setattr(pcc, "pcc_search_", fake_search)
    monkeypatch.setattr(pcc_plots, "save_pcc_plots", lambda result, out: [])
    config = {"ptq": {"pcc": {"num_images": 1, "theta": 0.5, "percentiles": None, "passes": 1}},
              "runtime": {"precision": "bf16-mixed"}}
    ctx = stages.StageContext(torch.nn.Linear(2, 2), [], [], config, tmp_path, RunLogger(tmp_path), False)
    stages.pcc_stage(ctx)
    assert seen["precision"] == "bf16-mixed"
    assert '"pcc/records": [{"module": "m"}]' in (tmp_path / "log.jsonl").read_text()


@pytest.mark.parametrize("precision,autocast", [("32-true", False), ("bf16-mixed", True)])
def test_every_pcc_forward_runs_in_the_engine_precision(random_calibration_items, precision, autocast):
    model = build_tiny_sam(seed=0).eval()
    quantize_(model, w4a4(observer="minmax"))
    seen = []
    hooks = [m.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
             for m in (model.image_encoder, model.mask_decoder)]
    result = pcc_search_(model, random_calibration_items, passes=1, percentiles=(0.99, 1.0), show_progress=False,
                         precision=precision)
    for h in hooks:
        h.remove()
    assert result.records and len(seen) > len(random_calibration_items)  # the FP reference and every capture
    assert set(seen) == {autocast}
