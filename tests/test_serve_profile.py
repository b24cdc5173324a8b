"""benchmarks/serve.py's decode-step profile: kernel time by group with overlapping kernels counted once."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import torch  # noqa: E402
from serve import exclusive_us, resident_layouts  # noqa: E402


def test_overlap_goes_to_the_kernel_that_started_first_and_groups_sum_to_busy_time():
    # act_quant 0-10 with the PDL matmul launched at 2 (it waits until 10, ends at 20), then attention, a gap, lm_head
    kernels = [("_gemv_kernel", 2.0, 20.0), ("_act_quant_kernel", 0.0, 10.0), ("flash_fwd_kernel", 20.0, 25.0),
               ("nvjet_tst_128x64", 30.0, 31.0), ("rms_norm_kernel", 25.0, 27.0)]
    got = exclusive_us(kernels)
    assert got == {"twla GEMV/GEMM": 10.0, "transform+quantize": 10.0, "attention": 5.0,
                   "dense GEMM (bf16/fp8, lm_head)": 1.0, "other": 2.0}
    assert sum(got.values()) == 28.0  # the union of the intervals: 0-27 and 30-31
    # a kernel wholly inside an earlier one adds nothing; disjoint kernels keep their durations
    assert exclusive_us([("gemm_kernel", 0.0, 10.0), ("act_quant", 3.0, 5.0)])["transform+quantize"] == 0.0
    # act_quant inside the GEMV's launch ("+fq") is the matmul's time, not "transform+quantize" or "other"
    assert exclusive_us([("_gemv_quant_kernel", 0.0, 4.0)])["twla GEMV/GEMM"] == 4.0


def test_resident_layouts_reads_the_layout_from_the_kept_tensors():
    from twla_vllm.kernels.triton_ops import layout

    words = torch.arange(16 * 6, dtype=torch.int32).view(16, 6)
    model = torch.nn.Module()
    for name, t in (("rows", words), ("chunks", layout.row_chunks(words, 8, 2)), ("again", words.clone())):
        sub = torch.nn.Module()
        sub.twla_packed = t
        model.add_module(name, sub)
    assert resident_layouts(model) == ["chunks", "rows"]
    assert resident_layouts(torch.nn.Linear(2, 2)) == []
