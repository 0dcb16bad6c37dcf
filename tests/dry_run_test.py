"""The dry run's breakdown of the largest buffers, read from optimised HLO text."""

from perceivers_jax.training import dry_run

_HLO = """HloModule jit_train_step

%fused_computation (param_0: f32[8,4096]) -> f32[8,4096,64] {
  %param_0 = f32[8,4096]{1,0} parameter(0)
  ROOT %broadcast.9 = f32[8,4096,64]{2,1,0} broadcast(%param_0), dimensions={0,1}
}

ENTRY %main (p0: bf16[8,32768,1024], p1: f32[1024,64]) -> f32[8,64] {
  %p0 = bf16[8,32768,1024]{2,1,0} parameter(0)
  %p1 = f32[1024,64]{1,0} parameter(1)
  %convert.1 = f32[8,32768,1024]{2,1,0} convert(%p0), metadata={op_name="jit(train_step)/jvp(cross)/kv_norm/convert_element_type"}
  %copy.2 = f32[8,32768,1024]{2,1,0} copy(%convert.1), metadata={op_name="jit(train_step)/chunks/copy"}
  %dot.3 = f32[8,32768,64]{2,1,0} dot(%convert.1, %p1), lhs_contracting_dims={2}, rhs_contracting_dims={0}
  %fusion.4 = f32[8,4096,64]{2,1,0} fusion(%dot.3), kind=kLoop, calls=%fused_computation
  ROOT %reduce.5 = f32[8,64]{1,0} reduce(%fusion.4), dimensions={1}
}
"""


def test_largest_buffers_ranks_materialised_values_and_names_their_code():
  buffers = dry_run.largest_buffers(_HLO, top=3)
  assert [b["shape"] for b in buffers] == ["f32[8,32768,1024]", "f32[8,32768,64]",
                                           "f32[8,4096,64]"]
  assert buffers[0]["bytes"] == 8 * 32768 * 1024 * 4 and buffers[0]["count"] == 2
  assert buffers[0]["jax_ops"][0].endswith("kv_norm/convert_element_type")
  # Parameters (bf16[8,32768,1024]) and values inside fusion bodies (the broadcast) are not
  # buffers of the step's own; the fusion's output is.
  assert all(b["shape"] != "bf16[8,32768,1024]" for b in dry_run.largest_buffers(_HLO))
  assert sum(b["shape"] == "f32[8,4096,64]" for b in dry_run.largest_buffers(_HLO)) == 1
  assert dry_run.largest_buffers(_HLO)[2]["count"] == 1
