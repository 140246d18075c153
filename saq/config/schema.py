"""Typed schemas of the ``saq.ptq``, ``saq.eval`` and ``saq.export`` configs: every key, its type and
its valid choices.

Registered in Hydra's ConfigStore (``saq.config.store``) and named first in the defaults of
``conf/ptq.yaml``, ``conf/eval.yaml`` and ``conf/export.yaml``, so a misspelt key or a value outside a choice fails at composition, before anything runs,
with the valid choices in the message. Open-ended nodes (data sources, prompts, loggers, paths) stay
``Any``: each has its own builder that names bad keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Mapping, Optional

from omegaconf import MISSING


class Choice(str, Enum):
    """A config choice: compares equal to its string and prints as it (also on Python 3.10)."""

    def __str__(self) -> str:
        return self.value


def typed_node(cls: type, node: Mapping[str, Any], where: str):
    """An instance of the schema dataclass ``cls`` from a config node (a dict or DictConfig): the node's
    keys that are fields of ``cls``, choices turned into their enum (a value outside the choices raises
    naming ``where.<field>`` and the choices), the schema's defaults for the rest."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in node:
            continue
        value = node[f.name]
        choice_type = type(f.default) if isinstance(f.default, Choice) else None
        if choice_type is not None and value is not None and not isinstance(value, choice_type):
            try:
                value = choice_type(value)
            except ValueError:
                raise ValueError(f"{where}.{f.name}={value!r}: choose one of "
                                 f"{[c.value for c in choice_type]}") from None
        values[f.name] = value
    return cls(**values)


class EvalBackend(Choice):
    torch = "torch"
    onnxruntime = "onnxruntime"
    openvino = "openvino"


class RuntimePrecision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"


class ModelName(Choice):
    vit_b = "vit_b"
    vit_l = "vit_l"
    vit_h = "vit_h"
    vit_t = "vit_t"
    tiny = "tiny"


class Granularity(Choice):
    tensor = "tensor"
    channel = "channel"


class Stage(Choice):
    bimodal = "bimodal"
    calibrate = "calibrate"
    pcc = "pcc"
    reconstruct = "reconstruct"
    reparam = "reparam"
    compensate = "compensate"


class ObserverName(Choice):
    minmax = "minmax"
    ema_minmax = "ema_minmax"
    percentile = "percentile"
    mse = "mse"
    mse_pooled = "mse_pooled"  # the MSE search on all calibration batches at once
    omse = "omse"
    agq = "agq"  # the log softmax quantizer's own search
    hybrid_log_uniform = "hybrid_log_uniform"  # the level-table quantizer's own search


class QuantizerKind(Choice):
    uniform = "uniform"
    log = "log"
    table = "table"  # a calibrated table of 2^b levels times a step (post-GELU inputs)


class UnitGranularity(Choice):
    layer = "layer"
    subblock = "subblock"
    block = "block"
    stage = "stage"


class Part(Choice):
    encoder = "encoder"
    decoder = "decoder"


class WeightRounding(Choice):
    adaround = "adaround"
    nearest = "nearest"


class ActivationStep(Choice):
    lsq = "lsq"
    fixed = "fixed"


class EncoderLoss(Choice):
    mse = "mse"
    par = "par"


class DecoderLoss(Choice):
    mse = "mse"
    clm = "clm"


class QDropDraws(Choice):
    bits = "bits"  # one random bit per element (p = 0.5; other p: uniform)
    uniform = "uniform"  # one float per element: the draws of runs made before bits existed


class CacheDtype(Choice):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


# engine loop precisions (Lightning's names; they start with a digit, so not enum member names)
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


class CalibStrategy(Choice):
    random = "random"
    first = "first"


@dataclass
class ModelConfig:
    name: ModelName = MISSING
    checkpoint: Optional[str] = None
    url: Optional[str] = None
    md5: Optional[str] = None
    npm_fallback: bool = False
    cache_dir: str = MISSING
    init_seed: int = 0


@dataclass
class TensorFormat:
    symmetric: bool = False
    granularity: Granularity = Granularity.tensor


@dataclass
class ComponentBits:
    """Bits of one part of SAM; null keeps that kind of tensor in floating point."""

    w_bits: Optional[int] = None
    a_bits: Optional[int] = None


@dataclass
class QuantRuleConfig:
    pattern: str = MISSING
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None


@dataclass
class QuantConfig:
    name: str = MISSING
    weight: TensorFormat = field(default_factory=lambda: TensorFormat(granularity=Granularity.channel))
    act: TensorFormat = field(default_factory=TensorFormat)
    encoder: ComponentBits = field(default_factory=ComponentBits)
    decoder: ComponentBits = field(default_factory=ComponentBits)
    rules: List[QuantRuleConfig] = field(default_factory=list)


@dataclass
class ObserverConfig:
    name: ObserverName = ObserverName.minmax
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SoftmaxQuantizerConfig:
    quantizer: QuantizerKind = QuantizerKind.uniform
    observer: Optional[ObserverName] = None  # null: the activation observer
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PostGeluQuantizerConfig:
    """The quantizer of every input a GELU feeds (found by data flow, saq.ptq.post_gelu)."""

    quantizer: QuantizerKind = QuantizerKind.table
    observer: ObserverName = ObserverName.hybrid_log_uniform
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ReconConfig:
    granularity: UnitGranularity = UnitGranularity.block
    parts: List[Part] = field(default_factory=lambda: [Part.encoder, Part.decoder])
    iters: int = 20000
    final_attn_iters: Optional[int] = None
    decoder_iters: Optional[int] = None
    weights: WeightRounding = WeightRounding.adaround
    activations: ActivationStep = ActivationStep.lsq
    w_lr: float = 1e-3
    a_lr: float = 4e-5
    qdrop_prob: float = 0.0
    qdrop_draws: QDropDraws = QDropDraws.bits
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    p: float = 2.0
    encoder_loss: EncoderLoss = EncoderLoss.mse
    par_mse_weight: float = 0.0
    decoder_loss: DecoderLoss = DecoderLoss.mse
    keep_best: bool = False
    best_window: int = 50
    cache_device: str = "cpu"
    cache_dtype: CacheDtype = CacheDtype.float32


@dataclass
class PCCConfig:
    theta: float = 0.5
    percentiles: Optional[List[float]] = None
    passes: int = 2
    num_images: int = 1


@dataclass
class ReparamConfig:
    """Channel reparameterization of post-LayerNorm activations (stage ``reparam``, saq.ptq.reparam)."""

    strength: float = 1.0  # 1: every channel gets the same range; 0: nothing changes
    shift: bool = True  # also align the channels' offsets (left out by itself where padding forbids it)
    num_images: Optional[int] = None  # calibration images for the channel ranges (null: all)
    attention: bool = False  # also balance q/k and v/out channels of the decoder's attentions
    values: bool = False  # also equalize the encoder attentions' value channels (their output projection's input)


class CompensateInputs(Choice):
    own = "own"  # the FP input through the layer's own activation quantizer (ERQ)
    chain = "chain"  # the quantized model's input (all upstream error)


@dataclass
class CompensateConfig:
    """Closed-form error compensation of Linear / 1x1 conv weights (stage ``compensate``, saq.ptq.compensate)."""

    refit: bool = False  # ridge re-fit of weights and biases (lowers layer MSE, cost AP on vit_t W4A4)
    inputs: CompensateInputs = CompensateInputs.own
    ridge: float = 0.01  # ridge strength, relative to the mean input energy
    gptq: bool = True  # round the re-fitted weights with error feedback (False: nearest rounding)
    parts: List[Part] = field(default_factory=lambda: [Part.encoder, Part.decoder])
    num_images: Optional[int] = 8  # calibration images the moments are gathered on (null: all)


@dataclass
class RecipeConfig:
    name: str = MISSING
    quantize: bool = True
    stages: List[Stage] = field(default_factory=list)
    weight_observer: ObserverConfig = field(default_factory=ObserverConfig)
    act_observer: ObserverConfig = field(default_factory=ObserverConfig)
    softmax_quantizer: Optional[SoftmaxQuantizerConfig] = None
    # AGQ (log softmax quantizer) search on at most this many attention maps per forward (a seeded
    # sample; null = every map, the reference). A CPU budget knob: set it for all recipes of a table.
    agq_max_maps: Optional[int] = None
    # null: post-GELU inputs get the activation quantizer like every other input
    post_gelu_quantizer: Optional[PostGeluQuantizerConfig] = None
    # true: the inputs of the encoder's depthwise convs get one scale per channel (saq.ptq.depthwise)
    depthwise_input_channels: bool = False
    recon: ReconConfig = field(default_factory=ReconConfig)
    pcc: PCCConfig = field(default_factory=PCCConfig)
    reparam: ReparamConfig = field(default_factory=ReparamConfig)
    compensate: CompensateConfig = field(default_factory=CompensateConfig)


@dataclass
class CalibConfig:
    data: Any = MISSING
    prompts: Any = MISSING
    num_images: int = 4
    strategy: CalibStrategy = CalibStrategy.random
    seed: int = 0
    max_prompts_per_image: Optional[int] = 16
    exclude_from_eval: bool = False
    weight_range_cache: Optional[str] = None  # a dir of weight ranges shared by runs; null: search every run


@dataclass
class EvalConfig:
    prompt_batch: int = 16
    num_workers: int = 0  # processes decoding images ahead of the model (0: in the main process)
    cache_fp: bool = True
    fp_cache_dir: str = MISSING
    save_checkpoint: bool = True
    reference_protocol: bool = False
    reference_drop_prob: float = 0.5
    side_by_side: int = 4
    num_shards: int = 1  # python -m saq.eval: evaluate every num_shards-th image, starting at shard
    shard: int = 0
    backend: EvalBackend = EvalBackend.torch  # saq.eval only: saq.ptq evaluates the fake-quant model
    runtime_precision: RuntimePrecision = RuntimePrecision.fp32
    compare_fake_quant: bool = False


@dataclass
class RuntimeConfig:
    device: str = "auto"
    num_threads: Optional[int] = None
    progress: bool = True
    precision: str = "32-true"  # the engine loops' Lightning precision: one of PRECISIONS
    compile: bool = False  # torch.compile the uniform fake quantization (same values, one kernel)
    keep_freed_memory: bool = True  # glibc keeps freed CPU memory for the next tensor (saq.utils.cpu_runtime)


@dataclass
class PTQRunConfig:
    """The whole ``saq.ptq`` config (the ``hydra`` node is Hydra's own)."""

    paths: Any = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    ptq: RecipeConfig = field(default_factory=RecipeConfig)
    data: Any = MISSING
    prompts: Any = MISSING
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    logger: Any = MISSING
    cluster: Any = None
    task_name: str = "ptq"
    seed: int = 0


@dataclass
class EvalRunConfig:
    """The whole ``saq.eval`` config: a saved checkpoint, evaluated on its run's data unless
    ``data`` / ``prompts`` are given."""

    paths: Any = MISSING
    data: Any = None
    prompts: Any = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    logger: Any = MISSING
    cluster: Any = None
    task_name: str = "eval"
    ckpt_path: str = MISSING


class ExportFormat(Choice):
    onnx = "onnx"  # QDQ with the checkpoint's scales and zero points
    onnx_fp = "onnx_fp"  # the FP model of the same run


class WeightLayout(Choice):
    auto = "auto"
    symmetric = "symmetric"
    int8 = "int8"
    uint8 = "uint8"


@dataclass
class ExportRunConfig:
    """The whole ``saq.export`` config."""

    paths: Any = MISSING
    ckpt_path: str = MISSING
    format: ExportFormat = ExportFormat.onnx
    out_dir: Optional[str] = None
    opset: int = 17
    weight_layout: WeightLayout = WeightLayout.auto


def bits_label(w_bits: Optional[int], a_bits: Optional[int]) -> str:
    """``w4a4``; a part kept in floating point reads as 16 bits (``w4a16`` is weight-only)."""
    return f"w{w_bits or 16}a{a_bits or 16}"


def quant_label(enc_w: Optional[int], enc_a: Optional[int], dec_w: Optional[int], dec_a: Optional[int]) -> str:
    """The name of a bit setting, derived from the bits actually used: ``w4a4``, or
    ``w4a4-dec-w4a8`` when the decoder's bits differ from the encoder's."""
    label = bits_label(enc_w, enc_a)
    if (dec_w, dec_a) != (enc_w, enc_a):
        label += "-dec-" + bits_label(dec_w, dec_a)
    return label
