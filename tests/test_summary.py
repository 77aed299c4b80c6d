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
