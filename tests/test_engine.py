"""The engine's precision setting reaches both loops: the reconstruction Trainer and the PCC search."""

import pytest
import torch

from saq.engine.precision import forward_context, precision_plugin
from saq.ptq import stages
from saq.utils.loggers import RunLogger


def test_precision_plugins_are_lightnings_and_bad_names_are_refused():
    assert not _autocast_inside(forward_context("32-true", torch.device("cpu")))
    assert _autocast_inside(forward_context("bf16-mixed", torch.device("cpu")))
    with pytest.raises(ValueError, match="runtime.precision='bf17'"):
        precision_plugin("bf17", torch.device("cpu"))


def _autocast_inside(context) -> bool:
    with context:
        return torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("precision,autocast", [("32-true", False), ("bf16-mixed", True)])
def test_pcc_stage_searches_in_the_engine_precision(monkeypatch, tmp_path, precision, autocast):
    seen = {}

    class FakeResult:
        records = []

        def to_json(self):
            return {}

        def table_rows(self):
            return [{"module": "m"}]

    def fake_search(model, items, **kwargs):
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return FakeResult()

    import saq.ptq.pcc as pcc
    import saq.ptq.pcc_plots as pcc_plots

    monkeypatch.setattr(pcc, "pcc_search_", fake_search)
    monkeypatch.setattr(pcc_plots, "save_pcc_plots", lambda result, out: [])
    config = {"ptq": {"pcc": {"num_images": 1, "theta": 0.5, "percentiles": None, "passes": 1}},
              "runtime": {"precision": precision}}
    ctx = stages.StageContext(torch.nn.Linear(2, 2), [], [], config, tmp_path, RunLogger(tmp_path), False)
    stages.pcc_stage(ctx)
    assert seen["autocast"] is autocast
    assert '"pcc/records": [{"module": "m"}]' in (tmp_path / "log.jsonl").read_text()
