"""Reconstruction on the tiny model: it helps, it deploys honestly, and it resumes identically."""

import pytest
import torch

from helpers.rules import w4a4
from saq.data import dataset_from_config, gt_prompts, select_calibration
from saq.engine.losses import lp_loss
from saq.engine.reconstruction import unit_quantizers
from saq.models import build_tiny_sam
from saq.ptq.image_source import ImageSource
from saq.models.units import reconstruction_units
from saq.nn import assert_deployable, deployment_problems, harden_weights_, quantize_
from saq.ptq.calibrate import calibrate_
from saq.models.predictor import encode_image
from saq.ptq.capture import capture_inputs, share_repeated_rows, to_device
from saq.ptq.reconstruct import STATE_FILE, reconstruct_
from saq.quant import QuantMode, iter_quantizers, quant_mode, set_quant_mode
from saq.utils.loggers import RunLogger

RULES = w4a4(observer="minmax")
RECON = {"iters": 60, "granularity": "block", "parts": ["encoder", "decoder"], "weights": "adaround",
         "activations": "lsq", "w_lr": 1e-2, "a_lr": 1e-3, "qdrop_prob": 0.5, "best_window": 10}


@pytest.fixture(scope="module")
def items(coco8):
    ds = dataset_from_config(coco8)
    return select_calibration(ds, gt_prompts(ds), 6, "first", max_prompts_per_image=4)


def calibrated_tiny(items):
    model = build_tiny_sam(seed=2).eval()
    quantize_(model, RULES)
    calibrate_(model, items, show_progress=False)
    return model


def unit_error(model, unit, items):
    """Output error of one unit on the given items: quantized path vs FP target."""
    with quant_mode(model, QuantMode.OFF):
        fp_in = capture_inputs(model, [unit.entry], items, torch.device("cpu"))[unit.entry]
        targets = [unit.run(model, *to_device(i, torch.device("cpu"))) for i in fp_in]
    q_in = capture_inputs(model, [unit.entry], items, torch.device("cpu"))[unit.entry]
    with torch.no_grad():
        return sum(float(lp_loss(unit.run(model, *i), t)) for i, t in zip(q_in, targets)) / len(q_in)


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_reconstruction_lowers_held_out_error_and_deploys(items, tmp_path, granularity):
    train, held_out = items[:4], items[4:]
    model = calibrated_tiny(train)
    unit = next(u for u in reconstruction_units(model, granularity) if unit_quantizers(model, u))
    with torch.no_grad():
        before_model = calibrated_tiny(train)
        harden_weights_(before_model)
        before = unit_error(before_model, unit, held_out)
    stats = reconstruct_(model, train, {**RECON, "iters": 150, "parts": ["encoder"]}, tmp_path, RunLogger(tmp_path),
                         show_progress=False, units=[unit])
    assert stats[0]["unit"] == unit.name and stats[0]["time_s"] > 0
    # the unit's time splits into its captures and its 150 steps
    assert 0 <= stats[0]["setup_s"] < stats[0]["time_s"]
    assert stats[0]["ms_per_iter"] * 150 / 1000 <= stats[0]["time_s"] - stats[0]["setup_s"] + 1e-6
    after = unit_error(model, unit, held_out)
    assert after < before
    harden_weights_(model)
    set_quant_mode(model, QuantMode.QUANTIZE)
    assert deployment_problems(model.eval()) == []


@pytest.mark.parametrize("architecture", ["tiny", "vit_t"])
def test_layer_units_follow_the_forward_order(architecture, items):
    """Layer-wise units: every Linear / Conv2d the encoder runs, each once, in the order it runs them."""
    from saq.models.build import build_architecture

    model = build_tiny_sam() if architecture == "tiny" else build_architecture("vit_t")
    names = {m: n for n, m in model.image_encoder.named_modules(prefix="image_encoder")}
    called, handles = [], [m.register_forward_pre_hook(lambda m, a: called.append(names[m]))
                           for m in names if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    with torch.no_grad():
        model.image_encoder(torch.zeros(1, 3, model.image_encoder.img_size, model.image_encoder.img_size))
    for h in handles:
        h.remove()
    units = reconstruction_units(model, "layer", ("encoder",))
    assert all(u.kind == "layer" and u.trains == (u.entry,) and u.feeds is None for u in units)
    assert [u.name for u in units if u.name in called] == called  # unique and in forward order
    assert "image_encoder.neck.0" in called


@pytest.mark.slow
def test_full_pipeline_leaves_no_soft_or_dropping_quantizer(items, tmp_path):
    model = calibrated_tiny(items[:3])
    reconstruct_(model, items[:3], RECON, tmp_path, RunLogger(tmp_path), show_progress=False)
    for m in model.modules():
        q = getattr(m, "weight_quantizer", None)
        if q is not None:
            assert not q.soft_rounding
    harden_weights_(model)
    assert assert_deployable(model.eval()) > 0


def test_soft_rounding_is_refused_by_the_gate(items):
    model = calibrated_tiny(items[:2])
    linear = model.mask_decoder.transformer.layers[0].mlp.lin1
    linear.weight_quantizer.enable_soft_rounding(linear.weight)
    harden_weights_(model)  # hardening switches it off ...
    assert assert_deployable(model.eval()) > 0
    linear.weight_quantizer.enable_soft_rounding(linear.weight)  # ... turning it on again is caught
    with pytest.raises(Exception, match="soft \\(AdaRound\\) rounding"):
        assert_deployable(model)


@pytest.mark.slow
@pytest.mark.parametrize("decoder_loss, killed_after", [("mse", 2), ("clm", None)])
def test_killed_run_resumes_identically(items, tmp_path, decoder_loss, killed_after):
    """Killed after a unit, resumed in a new process: the same model bit for bit. With CLM the kill falls
    after the first decoder layer, whose successors take their inputs (and targets) from it."""
    cfg = {**RECON, "iters": 20, "decoder_loss": decoder_loss}
    if killed_after is None:
        names = [u.name for u in reconstruction_units(calibrated_tiny(items[:2]), "block", decoder_loss="clm")]
        killed_after = names.index("mask_decoder.transformer.layers.0") + 1
    full = calibrated_tiny(items[:2])
    reconstruct_(full, items[:2], cfg, tmp_path / "full", RunLogger(tmp_path / "full"), seed=5, show_progress=False)

    killed = calibrated_tiny(items[:2])
    reconstruct_(killed, items[:2], cfg, tmp_path / "resumed", RunLogger(tmp_path / "resumed"), seed=5,
                 show_progress=False, stop_after=killed_after)
    assert (tmp_path / "resumed" / STATE_FILE).is_file()
    resumed = calibrated_tiny(items[:2])  # a new process: calibration again, then the checkpoint
    stats = reconstruct_(resumed, items[:2], cfg, tmp_path / "resumed", RunLogger(tmp_path / "resumed"), seed=5,
                         show_progress=False)
    assert len(stats) == len([u for u in reconstruction_units(full, "block", decoder_loss=decoder_loss)
                              if unit_quantizers(full, u)])
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_vit_t_reconstruction_few_iterations(vit_t_checkpoint, coco8, tmp_path):
    """Real TinyViT units (a block, a downsample, a decoder layer) reconstruct and deploy."""
    from saq.models import build_model

    ds = dataset_from_config(coco8)
    items = select_calibration(ds, gt_prompts(ds), 1, "first", max_prompts_per_image=2)
    model = build_model({"name": "vit_t", "checkpoint": str(vit_t_checkpoint)})
    quantize_(model, RULES)
    calibrate_(model, items, show_progress=False)
    wanted = {"image_encoder.layers.1.blocks.0", "image_encoder.layers.1.downsample", "mask_decoder.transformer.layers.1"}
    units = [u for u in reconstruction_units(model, "block") if u.name in wanted]
    assert {u.name for u in units} == wanted
    stats = reconstruct_(model, items, {**RECON, "iters": 4, "best_window": 2}, tmp_path, RunLogger(tmp_path),
                         show_progress=False, units=units)
    assert [s["unit"] for s in stats] == [u.name for u in units]
    harden_weights_(model)
    set_quant_mode(model, QuantMode.QUANTIZE)
    assert assert_deployable(model.eval()) > 0


def test_learned_steps_stay_positive_under_a_huge_learning_rate(items, tmp_path):
    """An Adam step larger than the activation step itself must not flip its sign (undeployable model)."""
    model = calibrated_tiny(items[:2])
    unit = [u for u in reconstruction_units(model, "block") if u.part == "decoder"][0]
    reconstruct_(model, items[:2], {**RECON, "iters": 5, "a_lr": 1e3, "qdrop_prob": 0.0, "parts": ["decoder"]},
                 tmp_path, RunLogger(tmp_path), show_progress=False, units=[unit])
    harden_weights_(model)
    set_quant_mode(model, QuantMode.QUANTIZE)
    assert_deployable(model)


def test_loss_curve_has_a_point_per_step_on_short_runs(items, tmp_path):
    """20 steps with the default best-window of 50 still give a 20-point curve to plot, not one point."""
    model = calibrated_tiny(items[:2])
    unit = next(u for u in reconstruction_units(model, "block") if unit_quantizers(model, u))
    stats = reconstruct_(model, items[:2], {**RECON, "iters": 20, "best_window": 50, "parts": ["encoder"]}, tmp_path,
                         RunLogger(tmp_path), show_progress=False, units=[unit])
    steps = [step for step, _ in stats[0]["curve"]]
    assert steps == list(range(1, 21)) and stats[0]["best_loss"] < float("inf")


def test_clm_units_give_local_outputs_and_the_final_tokens_with_later_layers_fp(items):
    """SAQ-SAM's decoder unit i returns (queries_i, keys_i, final queries) with layers after i in FP. It
    starts from layer i's own input (no rerun of the frozen layers before it); its targets start from the
    first layer's input and equal the FP transformer's."""
    from saq.models.units import decoder_clm_units

    model = calibrated_tiny(items[:2])
    transformer = model.mask_decoder.transformer
    units = decoder_clm_units(model)
    assert len(transformer.layers) >= 2, "the tiny model has two two-way layers"
    assert [u.kind for u in units] == ["decoder_layer"] * len(transformer.layers) + ["final_attn"]
    assert all(u.loss_weights == (0.01, 1.0, 1.0) and u.target_inputs == "quantized" for u in units[:-1])
    assert [u.entry for u in units[:-1]] == [f"mask_decoder.transformer.layers.{i}" for i in range(len(units) - 1)]
    assert units[1].target_entry == units[0].entry and units[0].target_entry is None
    entries = ["mask_decoder.transformer", units[0].entry, units[1].entry]
    captured = capture_inputs(model, entries, items[:1], torch.device("cpu"))
    (t_args, t_kwargs), first, second = (captured[e][0] for e in entries)
    with torch.no_grad():
        seen = {}
        hooks = [layer.register_forward_hook(lambda m, i, out, k=k: seen.update({k: out}))
                 for k, layer in enumerate(transformer.layers[:2])]
        with quant_mode(model, QuantMode.OFF):  # FP: the third output is the FP transformer's queries
            fp_final = transformer(*t_args, **t_kwargs)[0]
            fp_local = dict(seen)
            queries, keys, final = units[0].run(model, *first)
            torch.testing.assert_close(final, fp_final)
            torch.testing.assert_close((queries, keys), tuple(fp_local[0]))
            # unit 1's targets: the FP transformer from the first layer's input, layer 1's outputs captured
            t_queries, t_keys, t_final = units[1].target_run(model, *first)
            assert torch.equal(t_final, fp_final) and torch.equal(t_keys, fp_local[1][1])
        only_layer_0 = "mask_decoder.transformer.layers.0."
        with quant_mode(model, QuantMode.OFF, where=lambda name, q: not name.startswith(only_layer_0)):
            expected = transformer(*t_args, **t_kwargs)[0]
        _, _, final_q = units[0].run(model, *first)
        torch.testing.assert_close(final_q, expected)
        quantized_final = transformer(*t_args, **t_kwargs)[0]
        assert not torch.allclose(final_q, quantized_final)  # all layers quantized differs
        # unit 1 from layer 1's quantized input: layer 0 quantized (given), layer 1 quantized, the rest FP
        later = "mask_decoder.transformer.final_attn"
        with quant_mode(model, QuantMode.OFF, where=lambda name, q: name.startswith(later)):
            expected_1 = transformer(*t_args, **t_kwargs)[0]
        assert torch.equal(units[1].run(model, *second)[2], expected_1)
        # the last layer hands the final attention its call, as the transformer builds it
        fa_input = capture_inputs(model, [units[-1].entry], items[:1], torch.device("cpu"))[units[-1].entry][0]
        handed = units[-2].next_input(model, *second)
        assert all(torch.equal(handed[1][k], fa_input[1][k]) for k in ("q", "k", "v"))


@pytest.mark.slow
def test_clm_steps_do_not_rerun_the_frozen_decoder_layers_before_them(items, monkeypatch, tmp_path):
    """A CLM layer's steps start at its own input: the first layer, final once its unit is done, runs in
    the first unit's steps only, never in the steps of the units after it."""
    import saq.ptq.reconstruct as recon

    model = calibrated_tiny(items[:2])
    training = {}
    real_fit = recon._fit

    def fit(trainer, module, *args, **kwargs):
        training["unit"] = module.unit.name
        try:
            return real_fit(trainer, module, *args, **kwargs)
        finally:
            training.pop("unit")

    monkeypatch.setattr(recon, "_fit", fit)
    runs_in = []
    hook = model.mask_decoder.transformer.layers[0].register_forward_hook(
        lambda *_: runs_in.append(training.get("unit")))
    try:
        reconstruct_(model, items[:2], {**RECON, "iters": 3, "decoder_loss": "clm"}, tmp_path, RunLogger(tmp_path),
                     show_progress=False)
    finally:
        hook.remove()
    assert runs_in.count("mask_decoder.transformer.layers.0") == 3 * 2  # 3 steps, dropping and undropped passes
    assert {"mask_decoder.transformer.layers.1", "mask_decoder.transformer.final_attn_token_to_image"} \
        .isdisjoint(runs_in)


@pytest.mark.slow
def test_fp_targets_of_chained_units_are_the_next_units_captured_inputs(items, monkeypatch, tmp_path):
    """An encoder unit that feeds the next one takes its FP targets from the FP capture (no second FP
    pass); they equal what the unit computes with its quantizers off, and only the other units compute."""
    import saq.ptq.reconstruct as recon

    model = calibrated_tiny(items[:2])
    units = [u for u in reconstruction_units(model, "block") if unit_quantizers(model, u)]
    computed = []  # units whose outputs were computed with every quantizer off: an FP target pass
    real_outputs = recon._ChainInputs.outputs

    def outputs(chain, unit, inputs, run=None):
        if all(q.mode is QuantMode.OFF for _, q in iter_quantizers(chain.model)):
            computed.append(unit.name)
        return real_outputs(chain, unit, inputs, run)

    monkeypatch.setattr(recon._ChainInputs, "outputs", outputs)
    chain = recon._ChainInputs(model, items[:2], ImageSource(model), units, torch.device("cpu"), torch.device("cpu"),
                               None)
    chained = [u for u, nxt in zip(units, units[1:]) if u.feeds == nxt.entry and u.to_next is None]
    assert chained, "the tiny model's encoder units chain"
    for unit, nxt in zip(units, units[1:]):
        reused = chain.chained_fp_targets(unit, nxt)
        if unit in chained:
            with quant_mode(model, QuantMode.OFF):
                expected = real_outputs(chain, unit, chain.fp(unit))
            assert len(reused) == len(expected) and all(torch.equal(a, b) for a, b in zip(reused, expected))
        else:
            assert reused is None
    computed.clear()
    reconstruct_(model, items[:2], {**RECON, "iters": 2}, tmp_path, RunLogger(tmp_path), show_progress=False)
    assert computed == [u.name for u in units if u not in chained]


@pytest.mark.slow
def test_targets_are_computed_for_the_drawn_items_only(items, monkeypatch, tmp_path):
    """A unit trains on ``iters`` items drawn with replacement; the items it never draws get no FP target
    (at 20 steps over 32 images about half of them), the drawn ones the FP outputs, and the draws are
    those of the unit's seeded sampler, in its order."""
    import saq.ptq.reconstruct as recon
    from torch.utils.data import RandomSampler

    assert recon.unit_draws(32, 20, 7) == list(RandomSampler(range(32), replacement=True, num_samples=20,
                                                             generator=torch.Generator().manual_seed(7)))
    model = calibrated_tiny(items)
    seen = []
    real_unit_data = recon._unit_data

    def unit_data(unit, next_unit, chain, head, draws):
        data = real_unit_data(unit, next_unit, chain, head, draws)
        seen.append((unit, draws, data))
        return data

    monkeypatch.setattr(recon, "_unit_data", unit_data)
    reconstruct_(model, items, {**RECON, "iters": 2, "decoder_loss": "clm"}, tmp_path, RunLogger(tmp_path),
                 show_progress=False)
    computed = [(u, d, data) for u, d, data in seen if u.kind in ("decoder_layer", "final_attn")]
    assert computed, "the tiny model has decoder units whose targets are computed, not chained"
    for unit, draws, data in computed:
        assert len(draws) == 2 and len(data.targets) == len(items)
        assert {i for i, t in enumerate(data.targets) if t is not None} == set(draws), unit.name
    assert any(len(set(d)) < len(items) for _, d, _ in computed)  # some items were left out


@pytest.mark.slow
def test_the_neck_and_the_decoder_take_their_quantized_inputs_from_the_chain(items, monkeypatch, tmp_path):
    """The last encoder unit hands its output to the neck through the encoder's reshape, and the final
    neck hands the quantized image embeddings to the decoder units: the same tensors a quantized
    encoder pass gives, bit for bit, without one."""
    import saq.ptq.reconstruct as recon

    model = calibrated_tiny(items[:2])
    units = [u for u in reconstruction_units(model, "block") if unit_quantizers(model, u)]
    last, neck = [u for u in units if u.part == "encoder"][-2:]
    assert neck.kind == "neck" and last.feeds == neck.entry and last.to_next is not None
    set_quant_mode(model, QuantMode.QUANTIZE)
    chain = recon._ChainInputs(model, items[:2], ImageSource(model), units, torch.device("cpu"),
                               torch.device("cpu"), None)
    captured = capture_inputs(model, [last.entry, neck.entry], items[:2], torch.device("cpu"))
    chain.finished(last, captured[last.entry], [neck, *units[units.index(neck) + 1:]])
    handed = chain.quantized(neck)
    assert len(handed) == 2 and all(torch.equal(a[0][0], b[0][0]) and a[0][0].stride() == b[0][0].stride()
                                    for a, b in zip(handed, captured[neck.entry]))
    chain.finished(neck, handed, units[units.index(neck) + 1:])
    expected = [encode_image(model, ImageSource(model).image(item.image.path)) for item in items[:2]]
    for got, want in zip(chain.encoded, expected):
        assert torch.equal(got.embedding, want.embedding)
        assert (got.input_size, got.original_size) == (want.input_size, want.original_size)

    # a 16-bit cache rounds every handed tensor: the decoder's embeddings then come from a real encoder pass
    half = recon._ChainInputs(model, items[:2], ImageSource(model), units, torch.device("cpu"),
                              torch.device("cpu"), torch.float16)
    half.finished(neck, handed, units[units.index(neck) + 1:])
    assert half.encoded is None

    def no_encoder_pass(*args, **kwargs):
        raise AssertionError("a quantized encoder pass during reconstruction")

    monkeypatch.setattr(recon, "encode_items", no_encoder_pass)
    stats = reconstruct_(calibrated_tiny(items[:2]), items[:2], {**RECON, "iters": 2}, tmp_path,
                         RunLogger(tmp_path), show_progress=False)
    assert [s["unit"] for s in stats] == [u.name for u in units]


def test_an_encoder_unit_without_captured_fp_inputs_is_an_error(items):
    """FP inputs of encoder units are captured together at the start; asking for one that was not is a
    bug, never a silent capture through the decoder path."""
    import saq.ptq.reconstruct as recon

    model = calibrated_tiny(items[:2])
    units = [u for u in reconstruction_units(model, "block") if unit_quantizers(model, u)]
    chain = recon._ChainInputs(model, items[:2], ImageSource(model), [], torch.device("cpu"), torch.device("cpu"), None)
    with pytest.raises(RuntimeError, match="were not captured"):
        chain.fp(units[0])


def test_encoder_captures_stop_at_the_last_entry(items):
    """Capturing encoder inputs runs the encoder only up to the last entry of each image (no decoder,
    no later layers) and captures exactly what a full forward pass sees."""
    from saq.ptq.capture import run_items

    model = calibrated_tiny(items[:2])
    entries = [u.entry for u in reconstruction_units(model, "block") if u.part == "encoder"][:2]
    calls = {"neck": 0, "decoder": 0}
    hooks = [model.image_encoder.neck.register_forward_hook(lambda *_: calls.__setitem__("neck", calls["neck"] + 1)),
             model.mask_decoder.register_forward_hook(lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1))]
    early = capture_inputs(model, entries, items[:2], torch.device("cpu"))
    assert calls == {"neck": 0, "decoder": 0}
    full = {name: [] for name in entries}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: full[name].append(args[0].detach())) for name in entries]
    with torch.no_grad():
        run_items(model, items[:2])
    for h in hooks + handles:
        h.remove()
    assert calls["decoder"] > 0
    for name in entries:
        assert len(early[name]) == len(full[name]) == 2
        assert all(torch.equal(args[0], x) for (args, _), x in zip(early[name], full[name]))


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["subblock", "clm"])
def test_decoder_fp_inputs_are_captured_one_unit_at_a_time_and_only_when_used(items, monkeypatch, tmp_path,
                                                                              decoder):
    """Decoder inputs are per prompt and large: the FP capture at the start holds encoder entries only;
    a decoder unit with FP targets captures its own entry when it comes, a CLM unit (targets on the
    quantized path) never captures FP inputs."""
    import saq.ptq.reconstruct as recon

    model = calibrated_tiny(items[:2])
    captures = []
    real_capture = recon.capture_inputs

    def recording(m, entries, *args, **kwargs):
        captures.append((list(entries), next(q for _, q in iter_quantizers(m)).mode))
        return real_capture(m, entries, *args, **kwargs)

    monkeypatch.setattr(recon, "capture_inputs", recording)
    cfg = {**RECON, "iters": 2, "granularity": "subblock" if decoder == "subblock" else "block",
           "decoder_loss": "clm" if decoder == "clm" else "mse"}
    reconstruct_(model, items[:2], cfg, tmp_path, RunLogger(tmp_path), show_progress=False)
    first, *later = captures
    assert first[0] and all(e.startswith("image_encoder.") for e in first[0])
    decoder_captures = [(entries, mode) for entries, mode in later if entries[0].startswith("mask_decoder.")]
    assert all(len(entries) == 1 for entries, _ in decoder_captures)
    fp_decoder_captures = [entries for entries, mode in decoder_captures if mode is QuantMode.OFF]
    if decoder == "clm":
        assert fp_decoder_captures == []
    else:
        units = [u for u in reconstruction_units(model, "subblock") if u.part == "decoder"]
        assert fp_decoder_captures == [[u.entry] for u in units if unit_quantizers(model, u)]


def test_zero_iterations_freeze_the_calibration_without_any_capture(items, monkeypatch, tmp_path):
    """ptq.recon.iters=0 (a recipe's calibration alone): every unit is frozen and checkpointed, no input,
    target or PAR head is computed, and the frozen model equals one that captured everything first."""
    import saq.ptq.reconstruct as recon

    model = calibrated_tiny(items[:2])
    reference = calibrated_tiny(items[:2])
    forwards = []
    real_capture, real_outputs = recon.capture_inputs, recon._ChainInputs.outputs
    monkeypatch.setattr(recon, "capture_inputs", lambda m, entries, *a, **k: forwards.append(list(entries))
                        or real_capture(m, entries, *a, **k))
    monkeypatch.setattr(recon._ChainInputs, "outputs", lambda *a: forwards.append("outputs") or real_outputs(*a))
    stats = reconstruct_(model, items[:2], {**RECON, "iters": 0}, tmp_path / "a", RunLogger(tmp_path / "a"),
                         show_progress=False)
    assert forwards == [[]] and all(s["iters"] == 0 for s in stats)  # the empty encoder capture runs nothing
    units = [u for u in reconstruction_units(model, "block") if unit_quantizers(model, u)]
    assert [s["unit"] for s in stats] == [u.name for u in units]
    for unit in units:  # what the capturing path did: the module built and frozen
        recon.UnitReconstruction(reference, unit, recon.recon_settings({**RECON, "iters": 0})).finalize()
    harden_weights_(model)
    harden_weights_(reference)
    assert_deployable(model)
    a, b = model.state_dict(), reference.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_compiled_fake_quantization_reconstructs_the_same_model(items, tmp_path):
    """runtime.compile=true: reconstruction (QDrop, LSQ steps, AdaRound) with the compiled uniform fake
    quantization ends in the eager run's model, tensor for tensor."""
    from saq.quant.fused import use_fused_kernels_

    states = []
    for compiled in (False, True):
        model = calibrated_tiny(items[:2])
        assert use_fused_kernels_(model, compiled) > 0
        reconstruct_(model, items[:2], {**RECON, "iters": 3}, tmp_path / str(compiled),
                     RunLogger(tmp_path / str(compiled)), seed=1, show_progress=False)
        harden_weights_(model)
        states.append(model.state_dict())
    assert [k for k in states[0] if not torch.equal(states[0][k], states[1][k])] == []


def test_decoder_captures_store_per_prompt_repeats_once_and_give_the_same_outputs(items):
    """The decoder repeats the positional encoding (and at its first layer the image embedding) per prompt:
    the cache keeps one row of each, a stride-0 view, and the unit computes exactly what it did before."""
    model = build_tiny_sam(seed=2).eval()
    unit = next(u for u in reconstruction_units(model, "block", ("decoder",)) if u.kind == "decoder_layer")
    encoded = [encode_image(model, ImageSource(model).image(item.image.path)) for item in items[:2]]
    with torch.no_grad():
        captured = capture_inputs(model, [unit.entry], items[:2], torch.device("cpu"), encoded=encoded)[unit.entry]
    args, kwargs = captured[0]
    tensors = [*args, *kwargs.values()]
    shared = [t for t in tensors if t.dim() >= 2 and t.stride(0) == 0]
    assert len(shared) == 2, [(tuple(t.shape), t.stride()) for t in tensors]  # keys (layer 0) and key_pe
    assert all(t.shape[0] == len(items[0].prompts) > 1 for t in shared)
    dense = ([t.contiguous() for t in args], {k: v.contiguous() for k, v in kwargs.items()})
    with torch.no_grad():
        out_shared, out_dense = unit.run(model, args, kwargs), unit.run(model, *dense)
    assert all(torch.equal(a, b) for a, b in zip(out_shared, out_dense))
    assert share_repeated_rows(torch.arange(6.0).view(3, 2)).stride(0) == 2  # distinct rows stay as they are


@pytest.mark.slow
def test_calibration_keeps_the_fp_encoder_inputs_reconstruction_reads(items, monkeypatch, tmp_path):
    """Calibration's FP passes keep the FP inputs of the encoder units reconstruction trains: the same
    tensors a capture with every quantizer off gives; reconstruction then runs no encoder capture of its
    own and learns the same model, bit for bit."""
    import copy

    import saq.ptq.reconstruct as recon
    from saq.engine.reconstruction import recon_settings
    from saq.ptq.capture import KeptInputs

    model = build_tiny_sam(seed=2).eval()
    quantize_(model, RULES)
    cfg = {**RECON, "iters": 2}
    entries = recon.encoder_fp_entries(recon.training_units(recon.planned_units(model, cfg),
                                                            recon_settings(cfg)))
    assert len(entries) > 1
    kept = KeptInputs(entries, torch.device("cpu"))
    calibrate_(model, items[:2], show_progress=False, kept_inputs=kept)
    with quant_mode(model, QuantMode.OFF):
        captured = capture_inputs(model, entries, items[:2], torch.device("cpu"))
    for name in entries:
        assert len(kept.captured[name]) == len(captured[name]) == 2
        assert all(torch.equal(a[0], b[0]) and ka.keys() == kb.keys()
                   for (a, ka), (b, kb) in zip(kept.captured[name], captured[name]))
    assert kept.take(entries, [items[1].image.path, items[0].image.path]) is None  # other images (order)
    reference = copy.deepcopy(model)

    encoder_captures = []  # FP captures only: a unit's quantized input is still captured (the first one's)
    real_capture = recon.capture_inputs

    def recording(m, names, *args, **kwargs):
        if all(q.mode is QuantMode.OFF for _, q in iter_quantizers(m)):
            encoder_captures.extend(n for n in names if n.startswith("image_encoder."))
        return real_capture(m, names, *args, **kwargs)

    monkeypatch.setattr(recon, "capture_inputs", recording)
    reconstruct_(model, items[:2], cfg, tmp_path / "kept", RunLogger(tmp_path / "kept"), show_progress=False,
                 kept=kept)
    assert encoder_captures == [] and kept.captured == {}  # handed over, not held twice
    reconstruct_(reference, items[:2], cfg, tmp_path / "captured", RunLogger(tmp_path / "captured"),
                 show_progress=False)
    assert encoder_captures == entries
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


@pytest.mark.parametrize("stages,iters,keeps", [
    (["bimodal", "calibrate", "reconstruct"], 2, True),
    (["calibrate", "pcc", "reconstruct"], 2, False),  # PCC between them: the inputs are captured later
    (["bimodal", "calibrate", "reconstruct"], 0, False),  # nothing trains: nothing to keep
    (["calibrate"], 2, False),
])
def test_calibration_keeps_inputs_only_for_a_reconstruction_right_after_it(stages, iters, keeps):
    from types import SimpleNamespace

    from saq.ptq.stages import _inputs_reconstruction_reads

    model = build_tiny_sam(seed=2).eval()
    quantize_(model, RULES)
    kept = _inputs_reconstruction_reads(SimpleNamespace(
        model=model, config={"ptq": {"stages": stages, "recon": {**RECON, "iters": iters}}}))
    assert (kept is not None) == keeps
    if keeps:
        assert kept.entries and all(e.startswith("image_encoder.") for e in kept.entries)


def test_decoder_captures_stop_at_the_last_entry(items):
    """Capturing decoder inputs (from given image embeddings) runs each decoder call only up to the last
    entry (no later layer, no mask or IoU head) and captures exactly what a full decoder pass sees."""
    from saq.ptq.capture import encode_items, run_items

    model = calibrated_tiny(items[:2])
    entries = [u.entry for u in reconstruction_units(model, "block") if u.part == "decoder"][:1]
    assert entries and entries[0].startswith("mask_decoder.")
    encoded = encode_items(model, items[:2])
    heads = {"iou": 0}
    hook = model.mask_decoder.iou_prediction_head.register_forward_hook(
        lambda *_: heads.__setitem__("iou", heads["iou"] + 1))
    early = capture_inputs(model, entries, items[:2], torch.device("cpu"), encoded=encoded)
    assert heads["iou"] == 0
    full = {name: [] for name in entries}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, kwargs, name=name: full[name].append((args, kwargs)), with_kwargs=True) for name in entries]
    with torch.no_grad():
        run_items(model, items[:2], encoded)
    for h in [hook, *handles]:
        h.remove()
    assert heads["iou"] == 2
    for name in entries:
        assert len(early[name]) == len(full[name]) == 2
        for (args, kwargs), (want_args, want_kwargs) in zip(early[name], full[name]):
            assert len(args) == len(want_args) and all(torch.equal(a, b) for a, b in zip(args, want_args))
            assert kwargs.keys() == want_kwargs.keys() and all(torch.equal(kwargs[k], want_kwargs[k]) for k in kwargs)


def test_decoder_and_final_attention_units_can_have_their_own_iteration_counts(items, tmp_path):
    """decoder_iters sets the decoder's units, final_attn_iters the final attention over it; the encoder
    keeps iters. Checked on the steps each unit actually ran."""
    from saq.engine.reconstruction import recon_settings
    import saq.ptq.reconstruct as recon

    model = calibrated_tiny(items)
    cfg = {**RECON, "iters": 2, "decoder_iters": 3, "final_attn_iters": 1, "qdrop_prob": 0.0}
    planned = {u.name: (u.part, u.kind) for u in recon.planned_units(model, cfg)}
    stats = reconstruct_(model, items[:2], cfg, tmp_path, RunLogger(tmp_path), show_progress=False)
    ran = {row["unit"]: row["iters"] for row in stats}
    expected = {name: 1 if kind == "final_attn" else 3 if part == "decoder" else 2
                for name, (part, kind) in planned.items()}
    assert ran == expected and {1, 2, 3} <= set(ran.values())
    encoder_only = {**cfg, "decoder_iters": 0, "final_attn_iters": 0}
    training = recon.training_units(recon.planned_units(model, encoder_only), recon_settings(encoder_only))
    assert training and {u.part for u in training} == {"encoder"}
