"""The view rules (`jlora._src.interpret.rules.views`): each view of an adapted kernel, applied to the
`LoraValue`, means the same kernel as the view applied to the merged kernel written out in ``jnp``."""

import jax.numpy as jnp
import pytest
from jax import lax

from jlora._src.interpret.primitives import UNSTACK_P
from jlora._src.interpret.rules import views
from jlora._src.interpret.values import LoraValue
from tests.interpret._kernels import close, context, eqn_of, kernel, normal

W = normal(4, 6, 8)  # (stacked, fan-in, fan-out)

CASES = [
  ("transpose", views.transpose, lambda w: jnp.transpose(w, (0, 2, 1)), ()),
  ("reshape", views.reshape, lambda w: w.reshape(4, 6, 2, 4), ()),
  ("broadcast_in_dim", views.broadcast_in_dim, lambda w: w[:, None], ()),
  ("convert_element_type", views.convert_element_type, lambda w: w.astype(jnp.bfloat16), ()),
  ("slice", views.static_slice, lambda w: w[1:3, :, 2:6], ()),
  ("dynamic_slice", views.dynamic_slice, lambda w, *s: lax.dynamic_slice(w, s, (2, 6, 4)), (1, 0, 2)),
  ("rev", views.rev, lambda w: w[:, ::-1], ()),
  ("squeeze", views.squeeze, lambda w: lax.squeeze(w, (1,)), ()),
]


@pytest.mark.parametrize("primitive, rule, view, extra", CASES, ids=[c[0] for c in CASES])
def test_a_view_of_the_value_is_the_view_of_the_merged_kernel(primitive, rule, view, extra):
  w = W[:, :1] if primitive == "squeeze" else W
  value = kernel(w, (0, 1), (0, 2))  # the stacked axis rides on both factors
  starts = [jnp.int32(s) for s in extra]
  eqn = eqn_of(view, w, *starts, primitive=primitive)
  (out,) = rule(eqn, [value, *starts], context())
  assert isinstance(out, LoraValue)
  close(out.dense().astype(jnp.float32), view(value.dense(), *starts).astype(jnp.float32), tol=1e-2)


@pytest.mark.skipif(UNSTACK_P is None, reason="this JAX has no lax.unstack (jax 0.10 slices and squeezes)")
def test_unstack_gives_each_entry_of_the_stacked_axis():
  value = kernel(W, (0, 1), (0, 2))
  eqn = eqn_of(lax.unstack, W, primitive="unstack")  # what iterating over a kernel binds from jax 0.11
  outs = views.unstack(eqn, [value], context())
  assert len(outs) == 4
  for i, out in enumerate(outs):
    close(out.dense(), value.dense()[i])


def test_a_view_of_a_plain_array_is_left_to_jax():
  eqn = eqn_of(lambda w: jnp.transpose(w, (0, 2, 1)), W, primitive="transpose")
  assert views.transpose(eqn, [W], context()) is None
