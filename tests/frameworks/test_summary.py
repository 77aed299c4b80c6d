import jax.numpy as jnp

import jlora


def test_summary_format_and_numbers():
  base = {"a": {"kernel": jnp.zeros((100, 50))}, "b": {"bias": jnp.zeros(7)}}
  lora = {"a": {"kernel": {"lora_A": jnp.zeros((100, 4)), "lora_B": jnp.zeros((4, 50))}}}
  trainable = 4 * 150
  total = 5000 + 7 + trainable
  want = (
    f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
  )
  assert jlora.summary(base, lora) == want
  assert jlora.count_params(lora) == 600


def test_summary_thousands_separator():
  base = {"w": {"kernel": jnp.zeros((1024, 1024))}}
  lora = {"w": {"kernel": {"lora_A": jnp.zeros((1024, 512)), "lora_B": jnp.zeros((512, 1024))}}}
  assert jlora.summary(base, lora).startswith("trainable params: 1,048,576 || all params: 2,097,152")


def test_the_base_counts_its_parameters_not_its_state():
  """PyTorch's ``parameters()`` (what PEFT counts) holds no BatchNorm statistics or RNG state."""
  import flax.linen as nn  # noqa: PLC0415
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  class Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=True)(nn.Dense(6, name="fc")(x))

  variables = Linen().init(jax.random.key(0), jnp.ones((2, 5)))
  assert set(variables) == {"params", "batch_stats"}
  cfg = jlora.LoraConfig(r=2, target_modules=("fc",))
  lora = jlora.init(variables, cfg, key=jax.random.key(1))
  n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))  # 5*6 + 6 + 6 + 6
  assert n_params == 48
  assert jlora.summary(variables, lora).startswith(f"trainable params: 22 || all params: {n_params + 22:,d} ")

  class NNX(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(5, 6, rngs=rngs)
      self.bn = nnx.BatchNorm(6, rngs=rngs)
      self.drop = nnx.Dropout(0.1, rngs=rngs)

  model = NNX(nnx.Rngs(0))
  _, state, _ = jlora.nnx_split(model)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n_params == 48
  lora = jlora.init(state, cfg, key=jax.random.key(1))
  assert jlora.summary(state, lora).startswith(f"trainable params: 22 || all params: {n_params + 22:,d} ")


def test_a_quantized_weight_counts_the_entries_it_stands_for():
  base = {"w": {"kernel": jnp.zeros((64, 32))}}
  for qtype in ("nf4", "int8"):
    q = jlora.quantize(base, qtype=qtype, block_size=32)
    assert jlora.count_params(q) == 64 * 32, qtype  # not the packed codes and scales
