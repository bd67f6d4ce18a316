"""Every accuracy threshold of export verification and quantization, in one table (torch-free).

Stage tolerances are max absolute error on O(1) outputs (mean relative error for bf16, where a max
over millions of features says more about outliers than about accuracy); fp32 token checks are not
thresholds at all but the rounding rule of ``ppllava.numerics``. Agreement thresholds are top-1
agreement with the FP reference along its greedy path (teacher forced), on held-out prompts.
"""

from __future__ import annotations

# export / verify: each stage's output against the reference, by export precision
STAGE_TOLERANCES = {
    "fp32": {"vision": 1e-4, "text": 1e-4, "pool": 1e-4},
    "fp16": {"vision": 5e-2, "text": 1e-2, "pool": 5e-2},
    # the torch backend's bf16 stages (8-bit mantissa: ~8x fp16's rounding)
    "bf16": {"vision": 5e-2, "text": 5e-2, "pool": 5e-2},
}
STAGE_METRIC = {"fp32": "max_abs", "fp16": "max_abs", "bf16": "mean_rel"}
# export / verify, below fp32: top-1 agreement of the engine with the reference end to end
E2E_TOP1_MIN = 0.9

# quantize (vision / text / pool Q/DQ): worst visual-token cosine against the FP stages, held-out clips
QUANT_STAGES = {"visual_tokens_cosine": 0.99}
# quantize the LLM: top-1 agreement per scheme (TensorRT-LLM checkpoints, onnxruntime-genai variants)
QUANT_LLM_TOP1 = {"int8_sq": 0.95, "int8_wo": 0.95, "fp8": 0.95, "int4_awq": 0.90, "ort_int8": 0.95, "ort_int4": 0.90}
