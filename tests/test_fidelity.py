"""Guards of the method as docs/method.md specifies it (issue: SAQ-SAM as the paper specifies it).

Each test pins one point where an implementation could depart from the reference recipe."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers.rules import w4a4
from saq.cli.task import config_dir, register_resolvers
from saq.data import dataset_from_config, gt_prompts, select_calibration
from saq.data.calibration import cap_prompts
from saq.config.schema import ReconConfig
from saq.engine.reconstruction import UnitReconstruction, recon_settings
from saq.models import build_tiny_sam
from saq.models.units import DECODER_SUBBLOCKS, reconstruction_units
from saq.nn import quantize_
from saq.ptq.bimodal import kde_density
from saq.ptq.calibrate import calibrate_
from saq.ptq.capture import capture_inputs, encode_items
from saq.quant import QuantMode, quant_mode, set_quant_mode

RULES = w4a4(observer="minmax")
CPU = torch.device("cpu")


def _tensors(value):
    """Every tensor of a nested (args, kwargs) structure, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _tensors(value[k])]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _same(a, b):
    ta, tb = _tensors(a), _tensors(b)
    return len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb))


def _recipe(name, *overrides):
    register_resolvers()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("ptq", overrides=[f"ptq={name}", *overrides]).ptq


@pytest.fixture(scope="module")
def items(coco8):
    ds = dataset_from_config(coco8)
    return select_calibration(ds, gt_prompts(ds), 2, "first", max_prompts_per_image=3)


@pytest.fixture()
def model(items):
    model = build_tiny_sam(seed=2).eval()
    quantize_(model, RULES)
    calibrate_(model, items, show_progress=False)
    return model


def _batch(model, unit, items, quantized_embedding=True):
    encoded = encode_items(model, items) if unit.part == "decoder" and quantized_embedding else None
    q = capture_inputs(model, [unit.entry], items, CPU, encoded=encoded)[unit.entry][0]
    with quant_mode(model, QuantMode.OFF):
        fp = capture_inputs(model, [unit.entry], items, CPU)[unit.entry][0]
    return {"index": 0, "q": q, "fp": fp, "target": None, "head_target": None}


# 1, 2: decoder units --------------------------------------------------------------------------------
def test_decoder_units_never_mix_the_image_embedding(model, items):
    """QDrop acts inside a decoder unit's quantizers; its input (from the quantized embedding) is kept."""
    for loss in ("clm", "mse"):
        unit = next(u for u in reconstruction_units(model, "block", ("decoder",), loss))
        assert unit.qdrop_input is False
        module = UnitReconstruction(model, unit, ReconConfig(qdrop_prob=1.0, iters=1))
        module.make_trainable()  # what a fit's setup does
        seen = []
        module.run_unit = lambda args, kwargs: seen.append((args, kwargs)) or (torch.zeros(1),) * 3
        batch = _batch(model, unit, items)
        module.unit_output(batch)
        assert _same(seen[0], batch["q"])
        assert not _same(batch["q"], batch["fp"])  # the two embeddings do differ
        module.finalize()


def test_clm_final_token_term_is_computed_without_dropping(model, items):
    """With every quantizer dropping (p = 1) the local terms see FP activations; the final-token term
    must still be the quantized layer's (no dropping)."""
    unit = next(u for u in reconstruction_units(model, "block", ("decoder",), "clm"))
    assert unit.undropped_outputs == (2,) and unit.target_inputs == "quantized"
    batch = _batch(model, unit, items)
    args, kwargs = batch["q"]
    layer0 = "mask_decoder.transformer.layers.0."
    with torch.no_grad():
        quantized = unit.run(model, args, kwargs)
        # QDrop replaces activation quantizers' outputs by their inputs; weights stay quantized
        with quant_mode(model, QuantMode.OFF, where=lambda n, q: n.startswith(layer0) and q.role.value == "activation"):
            layer_fp = unit.run(model, args, kwargs)
    module = UnitReconstruction(model, unit, recon_settings({"qdrop_prob": 1.0, "iters": 1, "weights": "nearest"}))
    module.make_trainable()  # what a fit's setup does
    with torch.no_grad():
        out = module.unit_output(batch)
    torch.testing.assert_close(out[0], layer_fp[0])  # dropped: its quantizers pass FP values
    torch.testing.assert_close(out[2], quantized[2])  # not dropped
    assert not torch.allclose(out[2], layer_fp[2])
    module.finalize()


def test_final_attention_of_saq_learns_on_the_quantized_embedding(model):
    clm = reconstruction_units(model, "stage", ("decoder",), "clm")[-1]
    plain = reconstruction_units(model, "block", ("decoder",), "mse")[-1]
    assert clm.kind == plain.kind == "final_attn"
    assert clm.target_inputs == "quantized" and plain.target_inputs == "fp"


# 3: encoder units -----------------------------------------------------------------------------------
def test_encoder_units_mix_quantized_and_fp_inputs_and_target_the_fp_chain(model, items):
    unit = reconstruction_units(model, "block", ("encoder",))[1]  # its input depends on quantized block 0
    assert unit.qdrop_input and unit.target_inputs == "fp"
    batch = _batch(model, unit, items)
    assert not _same(batch["q"], batch["fp"])
    for prob, expected in ((1.0, "fp"), (0.0, "q")):
        module = UnitReconstruction(model, unit, ReconConfig(qdrop_prob=prob, iters=1))
        module.make_trainable()  # what a fit's setup does
        seen = []
        module.run_unit = lambda args, kwargs: seen.append((args, kwargs)) or torch.zeros(1)
        module.unit_output(batch)
        assert _same(seen[0], batch[expected])
        module.finalize()


# 4, 5, 6, 10: recipes -------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["saq_sam", "saq_base", "saq_par", "saq_pcc"])
def test_saq_recipes_use_no_rounding_regulariser(recipe):
    assert _recipe(recipe).recon.reg_weight == 0.0


@pytest.mark.parametrize("recipe", ["brecq", "qdrop", "ptq4sam_l"])
def test_baselines_keep_the_rounding_regulariser(recipe):
    assert _recipe(recipe).recon.reg_weight == 0.01


@pytest.mark.parametrize("recipe", ["saq_sam", "saq_star", "saq_pcc"])
def test_pcc_runs_after_the_fold_and_before_the_observers(recipe):
    stages = [str(s) for s in _recipe(recipe).stages]
    assert stages[:3] == ["bimodal", "pcc", "calibrate"]


@pytest.mark.parametrize("recipe", ["qdrop", "ptq4sam_l"])
def test_qdrop_style_recipes_start_from_running_average_min_max(recipe):
    assert str(_recipe(recipe).act_observer.name) == "ema_minmax"


@pytest.mark.parametrize("recipe", ["brecq", "qdrop", "ptq4sam_l", "saq_sam", "saq_base"])
def test_no_best_window_restoring_in_the_reference_recipes(recipe):
    assert _recipe(recipe).recon.keep_best is False
    assert _recipe(recipe, "ptq.recon.keep_best=true").recon.keep_best is True  # still an option


# 7: baseline granularity ----------------------------------------------------------------------------
def test_ptq4sam_l_reconstructs_each_decoder_attention_and_mlp(model):
    units = reconstruction_units(model, "subblock", ("decoder",), "mse")
    layers = len(model.mask_decoder.transformer.layers)
    expected = [f"mask_decoder.transformer.layers.{i}.{p}" for i in range(layers) for p in DECODER_SUBBLOCKS]
    assert [u.name for u in units] == expected + ["mask_decoder.transformer.final_attn_token_to_image"]
    assert all(u.entry == u.name and u.trains == (u.name,) for u in units)


def test_decoder_subblock_unit_reproduces_its_module(model, items):
    unit = reconstruction_units(model, "subblock", ("decoder",), "mse")[2]  # layer 0's MLP
    args, kwargs = _batch(model, unit, items)["q"]
    captured = {}
    handle = model.get_submodule(unit.name).register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    with torch.no_grad():
        from saq.ptq.capture import run_items
        run_items(model, items[:1], encode_items(model, items[:1]))
        handle.remove()
        torch.testing.assert_close(unit.run(model, args, kwargs), captured["out"])


def test_brecq_keeps_activations_quantized_with_fixed_ranges(model, items):
    unit = reconstruction_units(model, "block", ("encoder",))[0]
    set_quant_mode(model, QuantMode.QUANTIZE)
    module = UnitReconstruction(model, unit, ReconConfig(activations="fixed", iters=1))
    module.make_trainable()  # what a fit's setup does
    acts = [q for _, q in module.quantizers if q.role.value == "activation"]
    assert acts and len(module.scales) == 0
    assert all(q.mode is QuantMode.QUANTIZE and not q.scale_is_learnable for q in acts)
    module.finalize()


def test_a_unit_changes_the_model_only_inside_its_lifecycle(model):
    """Constructing a unit's module leaves the model alone; Lightning's setup makes it trainable and its
    on_train_end freezes it (the same finalize a unit without steps gets)."""
    unit = reconstruction_units(model, "block", ("encoder",))[0]
    module = UnitReconstruction(model, unit, ReconConfig(qdrop_prob=0.5, iters=1))
    assert module.has_parameters
    assert not any(q.soft_rounding or q.scale_is_learnable or q.drop_prob for _, q in module.quantizers)
    module.setup("fit")
    assert len(module.alphas) and len(module.scales) and any(q.drop_prob for _, q in module.quantizers)
    module.on_train_end()
    assert not any(q.soft_rounding or q.scale_is_learnable or q.drop_prob or q.training for _, q in module.quantizers)


# 8: BIG -----------------------------------------------------------------------------------------------
def test_kde_bandwidth_comes_from_the_full_tensor():
    x = torch.cat([torch.randn(30000) - 3, torch.randn(30000) + 3])
    points, density = kde_density(x, grid=16, max_points=1000)
    sample = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:1000]].double()
    bandwidth = float(x.double().std()) * x.numel() ** (-0.2)
    z = (points[:, None] - sample[None, :]) / bandwidth
    expected = torch.exp(-0.5 * z * z).sum(1) / (sample.numel() * bandwidth * (2 * torch.pi) ** 0.5)
    torch.testing.assert_close(density, expected)


def test_bimodal_detection_sees_every_prompt_of_the_first_image(items, monkeypatch):
    import saq.ptq.bimodal as bimodal

    sizes = []
    monkeypatch.setattr(bimodal, "is_bimodal", lambda k: sizes.append(k.shape[0]) or False)
    model = build_tiny_sam(seed=2).eval()
    quantize_(model, RULES)
    bimodal.bimodal_fold_(model, items[0])
    tokens_per_prompt = 2 + model.mask_decoder.num_mask_tokens + 1  # 2 box corners + iou + mask tokens
    assert len(items[0].prompts) > 1
    assert sizes and all(n % len(items[0].prompts) == 0 for n in sizes)
    assert sizes[0] >= len(items[0].prompts) * tokens_per_prompt


# 9: calibration -------------------------------------------------------------------------------------
def test_prompt_cap_applies_to_reconstruction_only(coco8):
    ds = dataset_from_config(coco8)
    prompts = gt_prompts(ds)
    full = select_calibration(ds, prompts, 3, "first")
    assert [len(i.prompts) for i in full] == [len(prompts[i.image.id]) for i in full]
    capped = cap_prompts(full, 2, seed=0)
    assert [i.image for i in capped] == [i.image for i in full]
    assert all(len(c.prompts) == min(2, len(f.prompts)) and set(map(id, c.prompts)) <= set(map(id, f.prompts))
               for c, f in zip(capped, full))
    assert cap_prompts(full, 2, seed=0) == capped and cap_prompts(full, None) == full


def test_paper_benchmark_calibrates_on_32_train_images():
    register_resolvers()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("ptq", overrides=["experiment=vit_t_coco"])
    assert cfg.calib.num_images == 32 and cfg.calib.max_prompts_per_image == 16
    assert Path(cfg.calib.data.images).name == "train2017" and Path(cfg.data.images).name == "val2017"
