"""The engine's loops: the PCC search is a Lightning predict loop that runs in the engine's precision;
one progress bar serves it and the reconstruction's fit loop."""

import pytest
import torch

from helpers.rules import w4a4
from saq.engine.progress import LoopProgress
from saq.engine.search import run_search, search_trainer
from saq.engine.trainer import engine_trainer, fit_quietly
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


def _fit_module():
    import lightning as L

    class Fit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            return {"rec": torch.tensor(float(batch_idx))}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    return Fit()


def test_one_progress_bar_follows_a_search_and_a_fit():
    seen = []
    search_bar = LoopProgress("search", 3, lambda record: seen.append(("search", record)) or {})
    run_search(search_trainer(torch.device("cpu"), "32-true", [search_bar]), lambda k: k, ["a", "b", "c"])
    assert seen == [("search", "a"), ("search", "b"), ("search", "c")] and search_bar.bar is None

    fit_bar = LoopProgress("recon unit", 25, lambda out: seen.append(("fit", float(out["rec"]))) or {}, every=10)
    trainer = engine_trainer(torch.device("cpu"), "32-true", max_epochs=1, logger=False, callbacks=[fit_bar],
                             num_sanity_val_steps=0)
    fit_quietly(trainer, _fit_module(), torch.utils.data.DataLoader(range(25), batch_size=None))
    assert seen[3:] == [("fit", 0.0), ("fit", 10.0), ("fit", 20.0)] and fit_bar.bar is None


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
