"""SAQ-SAM's Perceptual-Consistency Clipping (PCC) for the mask decoder's attention inputs.

The decoder's attention inputs of SAM carry extreme outliers; error metrics such as MSE never clip
them enough. PCC instead picks, for the inputs and outputs of q_proj and k_proj of every decoder
attention, the clipping percentile whose quantized attention map keeps the same *focus* as the FP
map: focus mask M = 1[A > theta * rowmax(A)], loss = mean over (prompt, head) of 1 - IoU(M, M^)
(docs/method.md section 4). The search is greedy (module by module, quantizer by quantizer, two passes),
with every other quantizer OFF except the PCC quantizers already fixed, so the image encoder runs
once per calibration image and each candidate recomputes only one side of one attention map.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from saq.data.calibration import CalibrationItem
from saq.engine.progress import LoopProgress
from saq.engine.search import run_search, search_trainer
from saq.ptq.image_source import ImageSource
from saq.models.predictor import EncodedImage, decode_boxes, model_device
from saq.nn.attention import QuantTwoWayAttention
from saq.quant.granularity import PerTensor
from saq.quant.observers import build_observer
from saq.quant.quantizer import FakeQuantizer, QuantMode, quant_mode
from saq.quant.stats import quantiles

# The four searched quantizers of a decoder attention, relative to the module, in search order.
PCC_POINTS: tuple[str, ...] = ("q_proj.input_quantizer", "k_proj.input_quantizer", "q_quantizer", "k_quantizer")

# The 29 clip percentiles of the reference code (docs/method.md section 4 abbreviates the middle of this list
# with "..."; it is not a 0.01 grid above 0.95), then p = 1 (no clipping) so that the search can never
# do worse than min-max on its own metric.
REFERENCE_PERCENTILES: tuple[float, ...] = (
    0.85, 0.87, 0.88, 0.89, 0.90, 0.91, 0.92, 0.93, 0.94, 0.95,
    0.96, 0.965, 0.97, 0.975, 0.98, 0.983, 0.985, 0.987, 0.989, 0.99,
    0.993, 0.995, 0.997, 0.999, 0.9993, 0.9995, 0.9997, 0.9999, 0.99999,
)
DEFAULT_PERCENTILES: tuple[float, ...] = REFERENCE_PERCENTILES + (1.0,)

_ATTENTION_KINDS = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")


def DECODER_ATTENTIONS(model: nn.Module) -> list[str]:  # noqa: N802 (name fixed by the callers)
    """Names of the mask decoder's quantized two-way attentions, in METHOD order.

    Per layer: self_attn, cross_attn_token_to_image, cross_attn_image_to_token; then the final
    token-to-image attention. Attentions kept in FP (not :class:`QuantTwoWayAttention`) are left out.
    """
    transformer = getattr(getattr(model, "mask_decoder", None), "transformer", None)
    if transformer is None:
        return []
    names = [f"mask_decoder.transformer.layers.{i}.{kind}"
             for i in range(len(getattr(transformer, "layers", []))) for kind in _ATTENTION_KINDS]
    names.append("mask_decoder.transformer.final_attn_token_to_image")
    return [n for n in names if isinstance(_submodule_or_none(model, n), QuantTwoWayAttention)]


def _submodule_or_none(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


# metric -------------------------------------------------------------------------------------------
def attention_focus(A: torch.Tensor, theta: float = 0.5) -> torch.Tensor:  # noqa: N803 (METHOD notation)
    """Bool mask of the entries above ``theta`` times their row maximum (row = last dim)."""
    return A > theta * A.amax(dim=-1, keepdim=True)


def focus_iou(A_fp: torch.Tensor, A_q: torch.Tensor, theta: float = 0.5,  # noqa: N803
              eps: float = 1e-6) -> torch.Tensor:
    """IoU of the two focus masks over each (Nq, Nk) map: shape ``A.shape[:-2]`` (e.g. prompts x heads)."""
    if A_fp.shape != A_q.shape:
        raise ValueError(f"attention maps differ in shape: {tuple(A_fp.shape)} vs {tuple(A_q.shape)}")
    if A_fp.ndim < 2:
        raise ValueError(f"attention maps need at least 2 dims (Nq, Nk), got shape {tuple(A_fp.shape)}")
    m, mq = attention_focus(A_fp, theta), attention_focus(A_q, theta)
    inter = (m & mq).sum(dim=(-2, -1)).float()
    union = (m | mq).sum(dim=(-2, -1)).float()
    return inter / (union + eps)


def focus_overlap_loss(A_fp: torch.Tensor, A_q: torch.Tensor, theta: float = 0.5,  # noqa: N803
                       eps: float = 1e-6) -> torch.Tensor:
    """mean(1 - IoU) of the attention focus over (prompt, head): 0 for identical maps, 1 for disjoint."""
    return (1.0 - focus_iou(A_fp, A_q, theta, eps)).mean()


# candidates ---------------------------------------------------------------------------------------
def clip_candidates(x: torch.Tensor, percentiles: Sequence[float]) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    """[(p, quantile(x, 1 - p), quantile(x, p))] over all of x; p = 1 gives (min, max).

    Nearest-rank quantiles (saq.quant.stats.quantile) from one sort of x, on x's device.
    """
    if x.numel() == 0:
        raise ValueError("clip_candidates of an empty tensor")
    percentiles = [float(p) for p in percentiles]
    for p in percentiles:
        if not 0.5 < p <= 1.0:
            raise ValueError(f"clip percentile must be in (0.5, 1], got {p}")
    bounds = quantiles(x, [1.0 - p for p in percentiles] + percentiles)
    return [(p, bounds[i], bounds[len(percentiles) + i]) for i, p in enumerate(percentiles)]


def best_candidate(percentiles: Sequence[float], losses: Sequence[float]) -> int:
    """Index of the lowest loss; ties go to the larger p (less clipping)."""
    if not losses or len(losses) != len(percentiles):
        raise ValueError(f"{len(percentiles)} percentiles but {len(losses)} losses")
    best: int | None = None
    for i in sorted(range(len(losses)), key=lambda j: -percentiles[j]):
        if best is None or losses[i] < losses[best]:  # strict: an equal loss keeps the larger p
            best = i
    return best


def quantizer_range(q: FakeQuantizer) -> tuple[float, float]:
    """The representable (lo, hi) of a calibrated per-tensor quantizer: ((qmin - z) s, (qmax - z) s)."""
    s, z = float(q.scale.detach()), float(q.zero_point.detach())
    return (q.qmin - z) * s, (q.qmax - z) * s


# result -------------------------------------------------------------------------------------------
@dataclass
class PCCRecord:
    """One searched quantizer in one pass."""

    module: str
    point: str
    pass_index: int
    percentiles: list[float]
    losses: list[float]
    chosen_p: float
    chosen_range: tuple[float, float]  # the clip bounds (quantiles) the quantizer was set to
    initial_range: tuple[float, float]  # representable range before PCC (from calibration's qparams)
    minmax_range: tuple[float, float]  # min and max of the same input (the no-clipping candidate)
    mse_range: tuple[float, float]  # what the MSE (Lp 2.4) observer picks on the same input
    loss_no_clip: float
    loss_chosen: float

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("chosen_range", "initial_range", "minmax_range", "mse_range"):
            d[key] = list(d[key])
        return d


@dataclass
class PCCResult:
    """Every record of a search, in search order."""

    records: list[PCCRecord] = field(default_factory=list)
    theta: float = 0.5
    passes: int = 2
    num_items: int = 0
    time_s: float = 0.0

    def last_pass(self) -> list[PCCRecord]:
        """The records of the final pass: the ranges the model ends up with."""
        return last_pass_records(self.records)

    def table_rows(self) -> list[dict[str, Any]]:
        """One flat row per record (for ``RunLogger.log_table``; the full curves are in ``to_json``)."""
        return [{"pass": r.pass_index, "module": r.module, "point": r.point, "chosen_p": r.chosen_p,
                 "chosen_lo": r.chosen_range[0], "chosen_hi": r.chosen_range[1],
                 "initial_lo": r.initial_range[0], "initial_hi": r.initial_range[1],
                 "minmax_lo": r.minmax_range[0], "minmax_hi": r.minmax_range[1],
                 "mse_lo": r.mse_range[0], "mse_hi": r.mse_range[1],
                 "loss_no_clip": r.loss_no_clip, "loss_chosen": r.loss_chosen} for r in self.records]

    def to_json(self) -> dict[str, Any]:
        return {"theta": self.theta, "passes": self.passes, "num_items": self.num_items, "time_s": self.time_s,
                "records": [r.to_json() for r in self.records]}


def last_pass_records(records: Sequence[PCCRecord]) -> list[PCCRecord]:
    if not records:
        return []
    last = max(r.pass_index for r in records)
    return [r for r in records if r.pass_index == last]


# capture helpers ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _first_inputs(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the first positional input of every call of ``module`` (a quantizer's tensor)."""
    store: list[torch.Tensor] = []

    def hook(_module, args):
        store.append(args[0].detach())

    handle = module.register_forward_pre_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@contextlib.contextmanager
def _call_inputs(module: nn.Module) -> Iterator[list[tuple[tuple, dict]]]:
    """Collects (args, kwargs) of every call of ``module``."""
    store: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        store.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs)))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


def _boxes(item: CalibrationItem) -> torch.Tensor:
    return torch.tensor([p.box_xyxy for p in item.prompts])


def _decode_all(model: nn.Module, encoded: list[EncodedImage], items: list[CalibrationItem]) -> None:
    for enc, item in zip(encoded, items):
        decode_boxes(model, enc, _boxes(item), return_masks=False)


def _pcc_quantizers(model: nn.Module, modules: list[str]) -> dict[tuple[str, str], FakeQuantizer]:
    """{(module, point): quantizer} for every PCC point that exists (a kept-FP q_proj has none)."""
    found: dict[tuple[str, str], FakeQuantizer] = {}
    for name in modules:
        attention = model.get_submodule(name)
        for point in PCC_POINTS:
            q = _submodule_or_none(attention, point)
            if not isinstance(q, FakeQuantizer):
                continue
            where = f"{name}.{point}"
            if q.spec.quantizer != "uniform" or not isinstance(q.granularity, PerTensor):
                raise ValueError(f"PCC needs a uniform per-tensor quantizer at {where}, got {q.extra_repr()}")
            if q.scale_is_learnable:
                raise RuntimeError(f"{where} already has a learnable step: PCC must run before reconstruction")
            found[(name, point)] = q
    return found


def _query_and_key(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The q and k of a captured ``attention(q, k, v)`` call (segment-anything passes them by name)."""
    bound = dict(zip(("q", "k", "v"), args))
    bound.update(kwargs)
    return bound["q"], bound["k"]


_QUERY_SIDE_POINTS = ("q_proj.input_quantizer", "q_quantizer")
_PROJECTED_POINTS = ("q_quantizer", "k_quantizer")  # after the projection: its output is fixed per search


class _PointMaps:
    """The attention maps of every captured call as a function of one PCC point's range.

    A point changes one side of q k^T only, and nothing before it: the other side, and for a point after
    the projection the projection itself, are computed once per search; each candidate recomputes the
    rest of its side and the map (no v, no output projection). Same operations as the module's forward,
    so the maps equal those of a full forward.
    """

    def __init__(self, attention: QuantTwoWayAttention, point: str, calls: list[tuple[tuple, dict]]) -> None:
        self.attention = attention
        self.query_side = point in _QUERY_SIDE_POINTS
        pairs = [_query_and_key(args, kwargs) for args, kwargs in calls]
        varied_inputs = [q if self.query_side else k for q, k in pairs]
        self.fixed = [attention.keys(k) if self.query_side else attention.queries(q) for q, k in pairs]
        if point in _PROJECTED_POINTS:
            projection = attention.q_proj if self.query_side else attention.k_proj
            quantizer = attention.q_quantizer if self.query_side else attention.k_quantizer
            self.inputs = [projection(x) for x in varied_inputs]
            self.vary = lambda t: attention._separate_heads(quantizer(t), attention.num_heads)
        else:
            self.inputs = varied_inputs
            self.vary = attention.queries if self.query_side else attention.keys

    def __iter__(self) -> Iterator[torch.Tensor]:
        for x, fixed in zip(self.inputs, self.fixed):
            varied = self.vary(x)
            yield self.attention.attention_probs(*((varied, fixed) if self.query_side else (fixed, varied)))


def _attention_loss(maps: Iterable[torch.Tensor], fp_maps: list[torch.Tensor], call_items: list[int],
                    num_items: int, theta: float) -> float:
    """Focus-overlap loss of one attention's maps on its captured calls: mean over items of mean(1 - IoU)."""
    device = fp_maps[0].device
    sums = torch.zeros(num_items, dtype=torch.float64, device=device)
    counts = torch.zeros(num_items, dtype=torch.float64, device=device)
    for fp, qmap, item in zip(fp_maps, maps, call_items, strict=True):
        iou = focus_iou(fp, qmap, theta)
        sums[item] += (1.0 - iou).double().sum()
        counts[item] += iou.numel()
    return float((sums / counts.clamp_min(1.0)).mean())  # one host sync per candidate


def _mse_range(q: FakeQuantizer, xs: list[torch.Tensor], call_items: list[int], num_items: int) -> tuple[float, float]:
    """The MSE observer's range on the same inputs, one update per calibration image (as calibration does)."""
    observer = build_observer("mse", q.spec.bits, q.spec.symmetric, PerTensor())
    for item in range(num_items):
        per_item = [x.reshape(-1) for x, i in zip(xs, call_items) if i == item]
        if per_item:
            observer.update(torch.cat(per_item))
    lo, hi = observer.compute_range()
    return float(lo), float(hi)


def _search_point(record_base: dict[str, Any], attention: nn.Module, q: FakeQuantizer,
                  calls: list[tuple[tuple, dict]], fp_maps: list[torch.Tensor], call_items: list[int],
                  num_items: int, theta: float, percentiles: list[float]) -> PCCRecord:
    """Try every clip candidate on ``q`` (re-running only ``attention``), keep the best one set and enabled.

    ``record_base`` holds the record's module, point, pass_index and initial_range.
    """
    point_maps = _PointMaps(attention, record_base["point"], calls)
    with _first_inputs(q) as xs:
        for x in point_maps.inputs:
            point_maps.vary(x)
    x_all = torch.cat([x.reshape(-1) for x in xs])

    def score() -> float:
        return _attention_loss(point_maps, fp_maps, call_items, num_items, theta)

    candidates = clip_candidates(x_all, percentiles)
    q.set_mode(QuantMode.QUANTIZE)
    losses = []
    for _, lo, hi in candidates:
        q.set_range(lo, hi)
        losses.append(score())
    x_min, x_max = x_all.min(), x_all.max()
    if 1.0 in percentiles:
        loss_no_clip = losses[percentiles.index(1.0)]
    else:  # measured for the record only, not a candidate
        q.set_range(x_min, x_max)
        loss_no_clip = score()
    if record_base["initial_range"] is None:  # searched before calibration: min-max is its starting range
        record_base = {**record_base, "initial_range": (float(x_min), float(x_max))}
    best = best_candidate(percentiles, losses)
    p, lo, hi = candidates[best]
    q.set_range(lo, hi)  # stays in QUANTIZE: later searches see it fixed
    return PCCRecord(**record_base, percentiles=list(percentiles), losses=losses, chosen_p=p,
                     chosen_range=(float(lo), float(hi)), minmax_range=(float(x_min), float(x_max)),
                     mse_range=_mse_range(q, xs, call_items, num_items), loss_no_clip=loss_no_clip,
                     loss_chosen=losses[best])


# search -------------------------------------------------------------------------------------------
class _GreedySearch:
    """The state of one search: the FP reference maps (captured once), and the current attention's inputs.

    ``step((pass_index, module, point))`` searches one point. A module's inputs depend only on the
    quantizers upstream of it, never on its own, so one capture per (pass, module) serves all its points
    (it equals a fresh capture before each point).
    """

    def __init__(self, model: nn.Module, items: list[CalibrationItem], modules: list[str],
                 quantizers: dict[tuple[str, str], FakeQuantizer], theta: float, percentiles: list[float],
                 images: ImageSource) -> None:
        self.model, self.items, self.modules, self.quantizers = model, items, modules, quantizers
        self.theta, self.percentiles, self.images = theta, percentiles, images
        # PCC normally runs before the observers (docs/method.md section 4): an uncalibrated point has no range
        self.initial = {key: quantizer_range(q) if q.is_calibrated else None for key, q in quantizers.items()}
        self.encoded: list[EncodedImage] = []
        self.fp_maps: dict[str, list[torch.Tensor]] = {}
        self.call_items: list[int] = []  # calibration item of each decoder call (boxes come in batches)
        self.calls_of: tuple[int, str] | None = None
        self.calls: list[tuple[tuple, dict]] = []

    def capture_reference(self) -> None:
        """FP maps of every decoder attention; the encoder runs once per image and its embedding is
        reused by every later decoder run. Every quantizer is OFF at this point."""
        self.encoded = [self.images.fp_embedding(item.image.path) for item in self.items]
        with contextlib.ExitStack() as stack:
            stores = {n: stack.enter_context(_first_inputs(self.model.get_submodule(n).softmax_quantizer))
                      for n in self.modules}
            first = self.modules[0]
            for index, (enc, item) in enumerate(zip(self.encoded, self.items)):
                before = len(stores[first])
                decode_boxes(self.model, enc, _boxes(item), return_masks=False)
                self.call_items.extend([index] * (len(stores[first]) - before))
        self.fp_maps = {n: list(stores[n]) for n in self.modules}
        for n in self.modules:
            if len(self.fp_maps[n]) != len(self.call_items):
                raise RuntimeError(f"{n} ran {len(self.fp_maps[n])} times for {len(self.call_items)} decoder calls")

    def step(self, key: tuple[int, str, str]) -> PCCRecord:
        pass_index, name, point = key
        if not self.fp_maps:
            self.capture_reference()
        attention = self.model.get_submodule(name)
        if self.calls_of != (pass_index, name):
            self.calls = []  # free the previous module's inputs before capturing the next
            with _call_inputs(attention) as calls:
                _decode_all(self.model, self.encoded, self.items)
            self.calls_of, self.calls = (pass_index, name), calls
        base = {"module": name, "point": point, "pass_index": pass_index, "initial_range": self.initial[(name, point)]}
        return _search_point(base, attention, self.quantizers[(name, point)], self.calls, self.fp_maps[name],
                             self.call_items, len(self.items), self.theta, self.percentiles)


def _progress_postfix(record: PCCRecord) -> dict[str, Any]:
    return {"module": record.module.rsplit(".", 1)[-1], "p": record.chosen_p, "loss": f"{record.loss_chosen:.3f}"}


@torch.no_grad()
def pcc_search_(model: nn.Module, items: list[CalibrationItem], theta: float = 0.5,
                percentiles: Sequence[float] = DEFAULT_PERCENTILES, passes: int = 2,
                show_progress: bool = True, images: ImageSource | None = None,
                precision: str = "32-true") -> PCCResult:
    """Greedy PCC search over the decoder attentions' q/k quantizers; sets the chosen ranges in place.

    The model must be quantized; by the reference order PCC runs after the bimodal fold and before the
    observers (uncalibrated PCC points start from their min-max range; calibrate_ with
    ``keep_calibrated=True`` then leaves the searched ranges alone). During the search every quantizer is
    OFF except the PCC quantizers fixed so far (QUANTIZE); on return each quantizer has its previous mode
    back and the searched ones keep their chosen range. The steps run in a Lightning predict loop
    (``saq.engine.search``) on the model's device, every forward in ``precision``'s autocast.
    """
    if not items:
        raise ValueError("pcc_search_ needs at least one calibration item")
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    percentiles = [float(p) for p in percentiles]
    if not percentiles:
        raise ValueError("pcc_search_ needs at least one clip percentile")
    modules = DECODER_ATTENTIONS(model)
    if not modules:
        raise ValueError("the model has no quantized mask-decoder attention (QuantTwoWayAttention): "
                         "quantize_ the decoder attentions before PCC")
    quantizers = _pcc_quantizers(model, modules)
    if not quantizers:
        raise ValueError(f"none of the decoder attentions has a quantizer at {PCC_POINTS}")
    steps = [(pass_index, name, point) for pass_index in range(passes) for name in modules for point in PCC_POINTS
             if (name, point) in quantizers]
    search = _GreedySearch(model, items, modules, quantizers, theta, percentiles, images or ImageSource(model))
    progress = [LoopProgress("pcc", len(steps), _progress_postfix)] if show_progress else []
    trainer = search_trainer(model_device(model), precision, progress)
    start = time.perf_counter()
    with quant_mode(model, QuantMode.OFF):
        records = run_search(trainer, search.step, steps)
    return PCCResult(records=list(records), theta=theta, passes=passes, num_items=len(items),
                     time_s=time.perf_counter() - start)
