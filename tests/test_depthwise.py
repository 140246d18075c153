"""Per-channel input scales for depthwise convolutions, against direct computations."""

import torch
from torch import nn

from saq.models.build import build_architecture
from saq.nn import QuantRule, quantize_
from saq.ptq.depthwise import depthwise_convs, with_depthwise_channel_rules
from saq.quant import QuantMode, QuantSpec, iter_quantizers
from saq.quant.quantizer import FakeQuantizer, Role


def test_per_channel_activation_scales_follow_each_channels_range():
    spread = torch.tensor([0.1, 1.0, 5.0, 20.0]).view(1, 4, 1, 1)
    xs = [torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(i)) * spread for i in range(3)]
    per_channel = FakeQuantizer(QuantSpec(4, granularity="channel1", observer="minmax"), Role.ACTIVATION)
    per_tensor = FakeQuantizer(QuantSpec(4, observer="minmax"), Role.ACTIVATION)
    for q in (per_channel, per_tensor):
        q.set_mode(QuantMode.OBSERVE)
        for x in xs:
            q(x)
        q.finalize_observer()
        q.set_mode(QuantMode.QUANTIZE)
    assert per_channel.scale.shape == (1, 4, 1, 1)
    # min-max per channel: the step of channel c spans that channel's own observed range
    data = torch.cat(xs)
    lo = data.amin(dim=(0, 2, 3)).clamp_max(0)
    hi = data.amax(dim=(0, 2, 3)).clamp_min(0)
    assert torch.allclose(per_channel.scale.flatten(), (hi - lo) / 15, rtol=1e-5)
    error_channel = (per_channel(data) - data).square().mean(dim=(0, 2, 3))
    error_tensor = (per_tensor(data) - data).square().mean(dim=(0, 2, 3))
    assert bool((error_channel[:3] < error_tensor[:3]).all())  # the narrow channels gain


def test_depthwise_inputs_get_channel_scales_and_other_convs_do_not():
    model = nn.Module()
    model.image_encoder = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1),
                                        nn.Conv2d(16, 16, 3, padding=1, groups=4))
    assert depthwise_convs(model) == ["image_encoder.0"]
    rules = with_depthwise_channel_rules(model, [QuantRule("*", QuantSpec(4, granularity="channel"), QuantSpec(4))])
    quantize_(model, rules)
    inputs = {n: q.spec.granularity for n, q in iter_quantizers(model) if q.role is Role.ACTIVATION}
    assert inputs == {"image_encoder.0.input_quantizer": "channel1", "image_encoder.1.input_quantizer": "tensor",
                      "image_encoder.2.input_quantizer": "tensor"}


def test_tinyvit_local_convs_are_depthwise():
    names = depthwise_convs(build_architecture("vit_t", seed=0))
    assert sum(n.endswith("local_conv.c") for n in names) == 10  # one per transformer block
    assert all(n.startswith("image_encoder.layers.") for n in names)
