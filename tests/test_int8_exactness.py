"""The CPU check and the per-layer bound behind the int8 saturation warning (no model, no runtime)."""

from saq.export.int8_exactness import cpu_has_exact_int8_dot_product, saturating_layers, saturation_warning

AVX2_ONLY = "flags\t\t: fpu sse2 avx avx2 fma bmi2 avx512f"
WITH_VNNI = AVX2_ONLY + " avx512_vnni"


def test_cpu_flags_decide_for_x86_only():
    assert not cpu_has_exact_int8_dot_product(AVX2_ONLY, "x86_64")
    assert cpu_has_exact_int8_dot_product(WITH_VNNI, "x86_64")
    assert cpu_has_exact_int8_dot_product(AVX2_ONLY + " avx_vnni", "AMD64")
    assert cpu_has_exact_int8_dot_product(AVX2_ONLY + " amx_int8", "x86_64")
    assert cpu_has_exact_int8_dot_product("Features: fp asimd asimddp", "aarch64")  # not the x86 instruction


def _manifest(weight_as: str, w_code: int | None, a_bits: int, a_as: str = "qdq_uint8") -> dict:
    return {"weight_layout": "symmetric", "quantization_points": [
        {"name": "enc.fc.weight_quantizer", "role": "weight", "bits": 8, "exported_as": weight_as, "max_abs_code": w_code},
        {"name": "enc.fc.input_quantizer", "role": "activation", "bits": a_bits, "exported_as": a_as, "max_abs_code": None}]}


def test_a_layer_saturates_when_two_products_can_pass_int16():
    assert saturating_layers(_manifest("qdq_int8_zero_point_folded", 128, 8)) == ["enc.fc"]  # 2 x 255 x 128
    assert saturating_layers(_manifest("qdq_int8", 64, 8)) == []  # 2 x 255 x 64 = 32640 fits
    assert saturating_layers(_manifest("qdq_int8", 65, 8)) == ["enc.fc"]
    assert saturating_layers(_manifest("qdq_int8", 128, 6)) == []  # 6-bit activations: codes below 64
    assert saturating_layers(_manifest("qdq_int8", 128, 6, a_as="qdq_int8")) == ["enc.fc"]  # signed: the whole byte
    assert saturating_layers(_manifest("qdq_uint8", None, 8)) == []  # uint8 weights: widened, exact
    assert saturating_layers(_manifest("qdq_int8", None, 8)) == ["enc.fc"]  # older manifest: the type's bound
    assert saturating_layers(_manifest("qdq_int8", 128, 16, a_as="fp")) == []  # float input: no int8 GEMM
    weight_only = _manifest("qdq_int8", 128, 8)
    weight_only["quantization_points"].pop()  # W8A16: no input quantizer at all
    assert saturating_layers(weight_only) == []


def test_warning_names_the_fix_only_on_a_saturating_cpu():
    manifest = _manifest("qdq_int8_zero_point_folded", 128, 8)
    assert saturation_warning(manifest, exact_cpu=True) is None
    message = saturation_warning(manifest, exact_cpu=False)
    assert "1 layers" in message and "enc.fc" in message and "weight_layout=uint8" in message
    assert saturation_warning(_manifest("qdq_uint8", None, 8), exact_cpu=False) is None
    assert saturation_warning({"weight_layout": "fp32", "quantization_points": []}, exact_cpu=False) is None
