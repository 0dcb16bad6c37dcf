"""What the dry runs read from optimised HLO text: largest buffers, collectives per step, kernels."""

from perceivers_jax.parallel import compiled

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
  buffers = compiled.largest_buffers(_HLO, top=3)
  assert [b["shape"] for b in buffers] == ["f32[8,32768,1024]", "f32[8,32768,64]",
                                           "f32[8,4096,64]"]
  assert buffers[0]["bytes"] == 8 * 32768 * 1024 * 4 and buffers[0]["count"] == 2
  assert buffers[0]["jax_ops"][0].endswith("kv_norm/convert_element_type")
  # Parameters (bf16[8,32768,1024]) and values inside fusion bodies (the broadcast) are not
  # buffers of the step's own; the fusion's output is.
  assert all(b["shape"] != "bf16[8,32768,1024]" for b in compiled.largest_buffers(_HLO))
  assert sum(b["shape"] == "f32[8,4096,64]" for b in compiled.largest_buffers(_HLO)) == 1
  assert compiled.largest_buffers(_HLO)[2]["count"] == 1


# A scanned layer (24 iterations, a u32 counter as XLA's collective-matmul loops have) holding an all-reduce and a Mosaic kernel whose backend
# config spans lines, an async all-gather before it, an all-reduce over one-device groups
# (moving nothing), and a data-dependent loop (a decoder's).
_LOOPS_HLO = """HloModule jit_step

%body (p: (s32[], f32[1024])) -> (s32[], f32[1024]) {
  %p = (s32[], f32[1024]{0}) parameter(0)
  %x = f32[1024]{0} get-tuple-element(%p), index=1
  %all-reduce.1 = f32[1024]{0:T(1024)} all-reduce(%x), channel_id=1, to_apply=%add
  %splash_mha_fwd.3 = bf16[2,16,1024,64]{3,2,1,0} custom-call(%x), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "TUxJUu",
"xprof_metadata":"{}"
}}, metadata={op_name="jit(step)/splash"}
  ROOT %t = (s32[], f32[1024]{0}) tuple(%i, %all-reduce.1)
}

%cond (p: (s32[], f32[1024])) -> pred[] {
  %p = (s32[], f32[1024]{0}) parameter(0)
  %constant.7 = u32[]{:T(128)} constant(24)
  ROOT %lt = pred[] compare(%i, %constant.7), direction=LT
}

%decode_body (p: (s32[], bf16[8,64])) -> (s32[], bf16[8,64]) {
  %all-reduce.2 = bf16[8,64]{1,0} all-reduce(%y), channel_id=2, to_apply=%add
}

%decode_cond (p: (s32[], bf16[8,64])) -> pred[] {
  %n = s32[] get-tuple-element(%p), index=0
  %m = s32[] get-tuple-element(%p), index=2
  ROOT %lt = pred[] compare(%n, %m), direction=LT
}

ENTRY %main (a: f32[256]) -> f32[1024] {
  %a = f32[256]{0} parameter(0)
  %all-gather-start.1 = (f32[256]{0}, f32[1024]{0}) all-gather-start(%a), channel_id=3, dimensions={0}
  %all-gather-done.1 = f32[1024]{0} all-gather-done(%all-gather-start.1)
  %all-reduce.9 = f32[256]{0} all-reduce(%a), channel_id=4, replica_groups={{0},{1},{2},{3}}, to_apply=%add
  %while.1 = (s32[], f32[1024]{0}) while(%init), condition=%cond, body=%body
  %while.2 = (s32[], bf16[8,64]{1,0}) while(%init2), condition=%decode_cond, body=%decode_body
  ROOT %r = f32[1024]{0} get-tuple-element(%while.1), index=1
}
"""


def test_collectives_and_kernels_count_loop_iterations():
  assert compiled.collectives(_LOOPS_HLO) == {
      "all-gather": {"count": 1, "bytes": 4096, "in_unknown_loops": 0},
      "all-reduce": {"count": 25, "bytes": 24 * 4096 + 8 * 64 * 2, "in_unknown_loops": 1}}
  assert compiled.kernels(_LOOPS_HLO) == {"mosaic:splash_mha_fwd": 24}
