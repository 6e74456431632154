"""bf16: auto decides by a measurement of the dense step on the machine at hand, not by a CPU flag."""
from __future__ import annotations

import torch

from deepfm.cluster import dense_step_timer, native_bf16, resolve_bf16

CPU = torch.device("cpu")


def test_auto_takes_the_faster_measured_precision_where_bf16_is_native():
    native = native_bf16(CPU)[0]
    use, why = resolve_bf16("auto", CPU, timer=lambda bf16: 0.010 if bf16 else 0.020)
    assert use is native
    if native:
        assert why.endswith("20.0 ms fp32, 10.0 ms bf16 (mean over ranks): bf16 is faster")
    use, why = resolve_bf16("auto", CPU, timer=lambda bf16: 0.030 if bf16 else 0.020)
    assert use is False
    if native:
        assert why.endswith("20.0 ms fp32, 30.0 ms bf16 (mean over ranks): fp32 is faster")
    assert resolve_bf16(True, CPU, timer=lambda bf16: 1.0) == (True, "bf16: true in the config")


def test_the_dense_step_timer_measures_both_precisions():
    timer = dense_step_timer(32, (16, 16), 64, CPU)
    assert 0 < timer(False) < 1 and 0 < timer(True) < 1
