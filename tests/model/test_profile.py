"""``jaxwint2.profile``: HLO attribution, busy-time union, extrapolation, and a tiny CPU run."""

import dataclasses

import pytest

from jaxwint2 import profile
from jaxwint2.config import ErnieConfig
from jaxwint2.decoder import layer_groups

HLO = """HloModule jit_step, entry_computation_layout={()->()}

%fused_add (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %add.1 = f32[4]{0} add(%p, %p), metadata={op_name="jit(step)/while/body/moe/experts/add"}
}

%body.7 (arg: (s32[], f32[4])) -> (s32[], f32[4]) {
  %arg = (s32[], f32[4]{0}) parameter(0)
  %fusion.3 = f32[4]{0} fusion(%gte), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/while/body/moe/experts/add"}
  %pallas_call.2 = f32[4]{0} custom-call(%fusion.3), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/while/body/attention/jit(grouped_matmul)/pallas_call"}
  ROOT %t = (s32[], f32[4]{0}) tuple(%i, %pallas_call.2)
}

%cond.8 (arg: (s32[], f32[4])) -> pred[] {
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

ENTRY %main.9 (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %while.1 = (s32[], f32[4]{0}) while(%init), condition=%cond.8, body=%body.7
  %gemm_fusion_dot.4 = f32[4]{0} fusion(%x), kind=kCustom, calls=%fused_add, metadata={op_name="jit(step)/lm_head/dot_general"}
}
"""  # noqa: E501 - HLO lines are long


def test_index_hlo_maps_ops_to_scopes_and_layer_groups():
    idx = profile.index_hlo(HLO)
    assert profile.phase_of(idx.op_name["fusion.3"]) == "experts"
    assert profile.phase_of(idx.op_name["pallas_call.2"]) == "attention"
    assert profile.phase_of(idx.op_name["gemm_fusion_dot.4"]) == "lm_head"
    assert idx.group["fusion.3"] == 0 and idx.group["pallas_call.2"] == 0
    assert idx.group["gemm_fusion_dot.4"] is None  # in ENTRY, outside the layer loops
    assert profile.phase_of("jit(step)/while/body/moe/add") == "moe_other"
    assert profile.phase_of("jit(step)/add") == "other"


def test_busy_time_is_the_union_of_kernel_intervals():
    k = lambda s, d: profile.Kernel("k", "op", "m", s, d)  # noqa: E731
    assert profile.busy_ns([k(0, 10), k(5, 10), k(30, 5), k(31, 1)]) == 20.0


def test_extrapolation_scales_each_group_to_the_full_model():
    full = ErnieConfig.ernie45_300b_a47b()
    small = dataclasses.replace(full, num_hidden_layers=12)
    summary = {"group_ms": {"outside layers": 1.0, "group 0": 3.0, "group 1": 4.0,
                            "group 2": 5.0}}
    est = profile.extrapolate(summary, layer_groups(small), layer_groups(full))
    assert est["total"] == pytest.approx(1.0 + 3.0 + 4.0 + 5.0 / 5 * 47)


def test_tiny_model_profile_on_cpu_attributes_the_phases():
    rows = profile.profile(ErnieConfig.tiny(), layers=None, kernels="auto", batches=(2,),
                           context=32, block_size=16, steps=2)
    (row,) = rows
    phases = row["phase_ms"]
    for name in ("attention", "experts", "lm_head"):
        assert phases.get(name, 0) > 0, phases
    assert row["wall_ms_per_step"] > 0 and row["device_busy_ms"] > 0
