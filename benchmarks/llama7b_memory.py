"""Per-device memory of a LoRA train step vs. full fine-tuning, Llama-2-7B shapes; QLoRA bases.

Nothing is allocated: the steps are lowered from ``jax.ShapeDtypeStruct`` inputs carrying their
shardings and compiled for simulated CPU devices; the figures are XLA's
``compiled.memory_analysis()`` for one device.

Model: 32 layers (``nn.scan``), d=4096, 32 heads of 128, MLP 11008 (SwiGLU), vocab 32000, bf16
weights and activations, untied ``lm_head``; causal attention in blocks of 512 queries (the fp32
scores of one block at a time, as memory-efficient attention kernels keep them). Batch 8 x 2048
tokens. Mesh: 8-way FSDP: every base weight is sharded over its ``embed`` axis, the batch over the
same 8 devices. LoRA: r=16 on
q, k, v, o; fp32 adapters placed by `jlora.adapter_specs`; AdamW. Full fine-tuning: AdamW on all
bf16 weights, first moment in fp32.

With ``--qlora`` it also compiles the LoRA step on quantized bases (`jlora.quantize`: every
projection weight in nf4 or int8, block 64; embeddings, norms and head in bf16), on the 8-device
mesh and on one device with batch 4 x 2048 (remat).

Run: ``python benchmarks/llama7b_memory.py`` (add ``--no-remat-full`` to skip the slowest
compile, ``--qlora`` for the quantized bases). Writes ``benchmarks/results/llama7b_memory.json``.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jlora  # noqa: E402

GiB = 1024**3
RULES = (("batch", "fsdp"), ("embed", "fsdp"))  # every other logical axis replicated


@dataclasses.dataclass(frozen=True)
class Shape:
  vocab: int = 32000
  dim: int = 4096
  heads: int = 32
  mlp: int = 11008
  layers: int = 32
  remat: bool = True
  query_block: int = 512


def _init(names: tuple[str, ...], init: Any = None) -> Any:
  return nn.with_logical_partitioning(init or nn.initializers.lecun_normal(), names)


class RMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", _init(("norm",), nn.initializers.ones), (x.shape[-1],), jnp.bfloat16)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return (y * scale).astype(jnp.bfloat16)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> jax.Array:
  """Causal attention, computed in blocks of ``block`` queries, each rematerialised in the backward
  pass (as memory-efficient attention kernels do): the fp32 scores of one block live at a time."""
  b, n, h, hd = q.shape
  block = min(block, n)

  @jax.checkpoint
  def one(i: jax.Array) -> jax.Array:
    qi = jax.lax.dynamic_slice_in_dim(q, i * block, block, axis=1)
    s = jnp.einsum("bqhd,bkhd->bhqk", qi, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
    causal = (i * block + jnp.arange(block))[:, None] >= jnp.arange(n)[None, :]
    s = jnp.where(causal, s, -1e30)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1).astype(jnp.bfloat16), v)

  out = jax.lax.map(one, jnp.arange(n // block))  # (blocks, b, block, h, hd)
  return jnp.moveaxis(out, 0, 1).reshape(b, n, h, hd)


class Block(nn.Module):
  cfg: Shape
  act: Any  # NamedSharding of the (batch, seq, dim) hidden state

  @nn.compact
  def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
    cfg, hd = self.cfg, self.cfg.dim // self.cfg.heads
    x = jax.lax.with_sharding_constraint(x, self.act)
    kw = dict(use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    qkv = functools.partial(
      nn.DenseGeneral, features=(cfg.heads, hd), kernel_init=_init(("embed", "heads", "head_dim")), **kw
    )
    h = RMSNorm(name="input_layernorm")(x)
    q, k, v = (qkv(name=n)(h) for n in ("q_proj", "k_proj", "v_proj"))
    o = _attention(q, k, v, self.cfg.query_block)
    x = x + nn.DenseGeneral(
      cfg.dim, axis=(-2, -1), kernel_init=_init(("heads", "head_dim", "embed")), name="o_proj", **kw
    )(o)
    h = RMSNorm(name="post_attention_layernorm")(x)
    gate = nn.Dense(cfg.mlp, kernel_init=_init(("embed", "mlp")), name="gate_proj", **kw)(h)
    up = nn.Dense(cfg.mlp, kernel_init=_init(("embed", "mlp")), name="up_proj", **kw)(h)
    x = x + nn.Dense(cfg.dim, kernel_init=_init(("mlp", "embed")), name="down_proj", **kw)(nn.silu(gate) * up)
    return jax.lax.with_sharding_constraint(x, self.act), None


class Llama(nn.Module):
  cfg: Shape
  act: Any

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    cfg = self.cfg
    emb = _init(("vocab", "embed"), nn.initializers.normal(1.0))
    x = nn.Embed(
      cfg.vocab,
      cfg.dim,
      embedding_init=emb,
      dtype=jnp.bfloat16,
      param_dtype=jnp.bfloat16,
      name="embed_tokens",
    )(tokens)
    block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
    stack = nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=cfg.layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = stack(cfg, self.act, name="layers")(x, None)
    x = RMSNorm(name="norm")(x)
    return nn.Dense(
      cfg.vocab,
      use_bias=False,
      kernel_init=_init(("embed", "vocab")),
      dtype=jnp.bfloat16,
      param_dtype=jnp.bfloat16,
      name="lm_head",
    )(x)


def loss_fn(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def _with(sds: Any, sharding: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=sharding)


def _state(opt: optax.GradientTransformation, params: Any, shardings: Any, replicated: Any) -> Any:
  """Abstract optimizer state placed like the params it mirrors (counters replicated)."""
  state = jax.eval_shape(opt.init, params)
  return optax.tree_utils.tree_map_params(
    opt, _with, state, shardings, transform_non_params=lambda s: _with(s, replicated)
  )


def _stats(compiled: Any) -> dict[str, float]:
  m = compiled.memory_analysis()
  out = {
    "argument": m.argument_size_in_bytes,
    "output": m.output_size_in_bytes,
    "alias": m.alias_size_in_bytes,
    "temp": m.temp_size_in_bytes,
  }
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return {k: v / GiB for k, v in out.items()}


def _quantized(params: Any, shardings: Any, qtype: str) -> Any:
  """The abstract base with its projection weights quantized; codes and scales placed like the weight."""
  q = jax.eval_shape(lambda p: jlora.quantize(p, qtype=qtype, block_size=64), params)

  def fit(x: Any, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
    """``sharding``'s spec, replicating the axes it would not divide (a blocked axis shrinks)."""
    spec = list(sharding.spec) + [None] * (len(x.shape) - len(sharding.spec))
    sizes = [
      math.prod(sharding.mesh.shape[n] for n in ((e,) if isinstance(e, str) else e or ())) for e in spec
    ]
    spec = [e if d % n == 0 else None for e, d, n in zip(spec, x.shape, sizes)]
    return _with(x, NamedSharding(sharding.mesh, P(*spec)))

  def place(qleaf: Any, sharding: Any) -> Any:
    if not isinstance(qleaf, jlora.QuantizedArray):
      return _with(qleaf, sharding)
    return jax.tree_util.tree_map(lambda x: fit(x, sharding), qleaf)

  return jax.tree_util.tree_map(place, q, shardings, is_leaf=lambda x: isinstance(x, jlora.QuantizedArray))


def compile_steps(
  shape: Shape, batch: int, seq: int, *, full: bool, devices: int = 8, bases: tuple[str, ...] = ("bf16",)
) -> dict[str, Any]:
  mesh = jax.make_mesh((devices,), ("fsdp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:devices])
  replicated = NamedSharding(mesh, P())
  act = NamedSharding(mesh, P("fsdp", None, None))
  model = Llama(shape, act)
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=NamedSharding(mesh, P("fsdp", None)))
  boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)
  param_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)
  params = jax.tree_util.tree_map(_with, nn.unbox(boxed), param_sh)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  results: dict[str, Any] = {"base_params": n_params}

  cfg = jlora.LoraConfig(
    r=16, lora_alpha=32, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), dtype="float32"
  )
  lora_shapes = jax.eval_shape(
    lambda k: jlora.init(params, cfg, key=k, apply_fn=model.apply, example_args=(tokens,)), jax.random.key(1)
  )
  lora_sh = jlora.adapter_specs(boxed, lora_shapes, cfg, rules=RULES, mesh=mesh)
  lora = jax.tree_util.tree_map(_with, lora_shapes, lora_sh)
  results["lora_params"] = sum(x.size for x in jax.tree_util.tree_leaves(lora))
  opt = optax.adamw(1e-4)
  apply = jlora.wrap(model.apply, cfg)

  def lora_step(lora, opt_state, params, tokens):
    loss, grads = jax.value_and_grad(lambda a: loss_fn(apply(params, a, tokens), tokens))(lora)
    updates, opt_state = opt.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  state = _state(opt, lora, lora_sh, replicated)
  state_sh = jax.tree_util.tree_map(lambda s: s.sharding, state)
  for base in bases:
    base_params = params if base == "bf16" else _quantized(params, param_sh, base)
    t0 = time.perf_counter()
    compiled = (
      jax.jit(lora_step, out_shardings=(lora_sh, state_sh, replicated), donate_argnums=(0, 1))
      .lower(lora, state, base_params, tokens)
      .compile()
    )
    key = "lora" if base == "bf16" else f"lora_{base}"
    results[key] = {**_stats(compiled), "compile_s": time.perf_counter() - t0}

  if full:
    ft_opt = optax.adamw(1e-5, mu_dtype=jnp.float32)

    def full_step(params, opt_state, tokens):
      loss, grads = jax.value_and_grad(lambda p: loss_fn(model.apply(p, tokens), tokens))(params)
      updates, opt_state = ft_opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    ft_state = _state(ft_opt, params, param_sh, replicated)
    ft_state_sh = jax.tree_util.tree_map(lambda s: s.sharding, ft_state)
    t0 = time.perf_counter()
    compiled = (
      jax.jit(full_step, out_shardings=(param_sh, ft_state_sh, replicated), donate_argnums=(0, 1))
      .lower(params, ft_state, tokens)
      .compile()
    )
    results["full"] = {**_stats(compiled), "compile_s": time.perf_counter() - t0}
  return results


_LABELS = {
  "lora": "LoRA r=16 q,k,v,o",
  "lora_nf4": "QLoRA nf4 base",
  "lora_int8": "LoRA int8 base",
  "full": "full fine-tuning",
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--no-remat-full", action="store_true", help="skip full fine-tuning without remat")
  parser.add_argument("--qlora", action="store_true", help="also nf4 and int8 bases, 8 devices and one")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "llama7b_memory.json"))
  parser.add_argument(
    "--moe", action="store_true", help="only the MoE shape: expert LoRA vs full fine-tuning"
  )
  args = parser.parse_args()
  if args.moe:
    path = pathlib.Path(args.out).with_name("moe_memory.json")
    path.write_text(json.dumps({"jax": jax.__version__, **main_moe(args.batch, args.seq)}, indent=2) + "\n")
    print(f"wrote {path}")
    return
  runs = {}
  bases = ("bf16", "nf4", "int8") if args.qlora else ("bf16",)
  for remat in (True, False):
    print(f"compiling remat={remat} ...", flush=True)
    runs["remat" if remat else "no_remat"] = compile_steps(
      Shape(remat=remat), args.batch, args.seq, full=remat or not args.no_remat_full, bases=bases
    )
  if args.qlora:
    print("compiling one device, batch 4, remat ...", flush=True)
    runs["one_device_remat_batch4"] = compile_steps(Shape(), 4, args.seq, full=True, devices=1, bases=bases)
  print(f"\nLlama-2-7B shapes, batch {args.batch} x seq {args.seq}, 8-way FSDP, per-device GiB")
  print(f"{'step':<40}{'argument':>10}{'output':>9}{'alias':>9}{'temp':>9}{'total':>9}{'compile s':>11}")
  for name, run in runs.items():
    for kind, what in _LABELS.items():
      if kind in run:
        r = run[kind]
        label = f"{what} ({name.replace('_', '-')})"
        print(
          f"{label:<40}{r['argument']:>10.2f}{r['output']:>9.2f}{r['alias']:>9.2f}{r['temp']:>9.2f}"
          f"{r['total']:>9.2f}{r['compile_s']:>11.1f}"
        )
  meta = {
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": jax.device_count(),
    "batch": args.batch,
    "seq": args.seq,
    "mesh": {"fsdp": 8, "one_device_remat_batch4": 1},
    "units": "GiB per device (total = argument + output - alias + temp)",
  }
  path = pathlib.Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"meta": meta, **runs}, indent=2) + "\n")
  print(f"\nwrote {path}")


# -- a mixture-of-experts shape (``--moe``): expert LoRA beside full fine-tuning ------------------


@dataclasses.dataclass(frozen=True)
class MoEShape:
  """Mixtral-like widths (8 experts of 4096 -> 14336, top-2), 4 layers so the plan compiles quickly."""

  vocab: int = 32000
  dim: int = 4096
  mlp: int = 14336
  experts: int = 8
  top_k: int = 2
  layers: int = 4


def moe_apply(params: Any, tokens: jax.Array, cfg: MoEShape = MoEShape()) -> jax.Array:
  """Embedding, then per layer a top-k routed SwiGLU-free expert MLP through `lax.ragged_dot`."""
  x = params["embed"][tokens].reshape(-1, cfg.dim)

  @jax.checkpoint
  def layer(x, p):
    weights, experts = jax.lax.top_k(jax.nn.softmax((x @ p["router"]).astype(jnp.float32)), cfg.top_k)
    order = jnp.argsort(experts.reshape(-1))
    rows = order // cfg.top_k
    sizes = jnp.bincount(experts.reshape(-1), length=cfg.experts).astype(jnp.int32)
    h = nn.silu(jax.lax.ragged_dot(x[rows], p["experts"]["wi"], sizes))
    out = jax.lax.ragged_dot(h, p["experts"]["wo"], sizes) * weights.reshape(-1)[order][:, None].astype(
      x.dtype
    )
    return x + jnp.zeros_like(x).at[rows].add(out), None

  x, _ = jax.lax.scan(layer, x, params["layers"])
  return (x @ params["lm_head"]).reshape(*tokens.shape, cfg.vocab)


def compile_moe(batch: int, seq: int, cfg: MoEShape = MoEShape(), devices: int = 8) -> dict[str, Any]:
  """Per-device memory of an expert-LoRA step (r=16 on every expert's wi and wo) and of full fine-tuning."""
  mesh = jax.make_mesh((devices,), ("fsdp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:devices])
  sh = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
  bf = lambda shape, *spec: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sh(*spec))  # noqa: E731
  L, E, D, F = cfg.layers, cfg.experts, cfg.dim, cfg.mlp  # noqa: N806
  params = {
    "embed": bf((cfg.vocab, D), None, "fsdp"),
    "layers": {
      "router": bf((L, D, E), None, "fsdp"),
      "experts": {
        "wi": bf((L, E, D, F), None, None, "fsdp"),
        "wo": bf((L, E, F, D), None, None, None, "fsdp"),
      },
    },
    "lm_head": bf((D, cfg.vocab), "fsdp"),
  }
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sh("fsdp"))
  apply_fn = functools.partial(moe_apply, cfg=cfg)
  lcfg = jlora.LoraConfig(r=16, lora_alpha=32, target_modules=("experts/wi", "experts/wo"), dtype="float32")
  lora_shapes = jax.eval_shape(
    lambda k: jlora.init(params, lcfg, key=k, apply_fn=apply_fn, example_args=(tokens,)), jax.random.key(1)
  )
  lora_sh = jlora.adapter_specs(params, lora_shapes, lcfg, mesh=mesh)
  lora = jax.tree_util.tree_map(_with, lora_shapes, lora_sh)
  results: dict[str, Any] = {
    "base_params": sum(x.size for x in jax.tree_util.tree_leaves(params)),
    "lora_params": sum(x.size for x in jax.tree_util.tree_leaves(lora)),
  }
  replicated, opt, apply = sh(), optax.adamw(1e-4), jlora.wrap(apply_fn, lcfg)

  def lora_step(lora, opt_state, params, tokens):
    loss, grads = jax.value_and_grad(lambda a: loss_fn(apply(params, a, tokens), tokens))(lora)
    updates, opt_state = opt.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  def full_step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(apply_fn(p, tokens), tokens))(params)
    updates, opt_state = ft_opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  ft_opt = optax.adamw(1e-5, mu_dtype=jnp.float32)
  param_sh = jax.tree_util.tree_map(lambda x: x.sharding, params)
  for name, step, tree, tree_sh, o in (
    ("lora", lora_step, lora, lora_sh, opt),
    ("full", full_step, params, param_sh, ft_opt),
  ):
    state = _state(o, tree, tree_sh, replicated)
    state_sh = jax.tree_util.tree_map(lambda s: s.sharding, state)
    args = (tree, state, params, tokens) if name == "lora" else (tree, state, tokens)
    t0 = time.perf_counter()
    jitted = jax.jit(step, out_shardings=(tree_sh, state_sh, replicated), donate_argnums=(0, 1))
    results[name] = {**_stats(jitted.lower(*args).compile()), "compile_s": time.perf_counter() - t0}
  return results


def main_moe(batch: int, seq: int) -> dict[str, Any]:
  """``--moe``: prints and returns the expert-LoRA and full fine-tuning memory of `MoEShape`."""
  print(f"compiling MoE ({MoEShape()}), batch {batch} x {seq} ...", flush=True)
  run = compile_moe(batch, seq)
  for kind, what in (("lora", "expert LoRA r=16 wi,wo"), ("full", "full fine-tuning")):
    r = run[kind]
    print(f"MoE {what:<30} arg {r['argument']:.2f} temp {r['temp']:.2f} total {r['total']:.2f} GiB/device")
  return run


if __name__ == "__main__":
  main()
