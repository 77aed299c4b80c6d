"""jlora quickstart: LoRA on a small Llama-style decoder built from a config (random weights).

Run: python examples/quickstart.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jlora

VOCAB, D, HEADS, LAYERS, SEQ = 128, 64, 4, 2, 16


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    h = nn.RMSNorm(name="input_layernorm")(x)
    split = lambda y: y.reshape(b, t, HEADS, D // HEADS)
    q = split(nn.Dense(D, use_bias=False, name="q_proj")(h))
    k = split(nn.Dense(D, use_bias=False, name="k_proj")(h))
    v = split(nn.Dense(D, use_bias=False, name="v_proj")(h))
    att = nn.dot_product_attention(q, k, v, mask=nn.make_causal_mask(jnp.ones((b, t))))
    x = x + nn.Dense(D, use_bias=False, name="o_proj")(att.reshape(b, t, D))
    h = nn.RMSNorm(name="post_attention_layernorm")(x)
    up = nn.silu(nn.Dense(4 * D, use_bias=False, name="gate_proj")(h)) * nn.Dense(
      4 * D, use_bias=False, name="up_proj"
    )(h)
    return x + nn.Dense(D, use_bias=False, name="down_proj")(up)


class Decoder(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D, name="embed_tokens")(tokens)
    for i in range(LAYERS):
      x = Block(name=f"layers_{i}")(x)
    return nn.Dense(VOCAB, use_bias=False, name="lm_head")(nn.RMSNorm(name="norm")(x))


def loss(logits, tokens):
  logp = jax.nn.log_softmax(logits[:, :-1], -1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


model = Decoder()
tokens = jax.random.randint(jax.random.key(0), (8, SEQ), 0, VOCAB)
params = model.init(jax.random.key(1), tokens)  # the frozen base (random weights here)

cfg = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), lora_dropout=0.1)
lora = jlora.init(params, cfg, key=jax.random.key(2))  # separate trainable tree: only q/v adapters
apply = jlora.wrap(model.apply, cfg)  # model.apply's call, plus the adapter tree
print(jlora.summary(params, lora))

# At init B = 0, so the adapted model is the base model exactly.
assert (apply(params, lora, tokens) == model.apply(params, tokens)).all()

opt = optax.adamw(3e-3)
opt_state = opt.init(lora)


@jax.jit
def train_step(lora, opt_state, key):
  def objective(lora):
    return loss(apply(params, lora, tokens, lora_dropout_key=key), tokens)

  value, grads = jax.value_and_grad(objective)(lora)  # gradients for the adapter only
  updates, opt_state = opt.update(grads, opt_state, lora)
  return optax.apply_updates(lora, updates), opt_state, value


key = jax.random.key(3)
for step in range(30):
  key, sub = jax.random.split(key)
  lora, opt_state, value = train_step(lora, opt_state, sub)
  if step % 10 == 0 or step == 29:
    print(f"step {step:2d}  loss {float(value):.4f}")

merged = jlora.merge(params, lora, cfg)  # plain params for serving
logits = apply(params, lora, tokens)
assert jnp.allclose(logits, model.apply(merged, tokens), rtol=1e-5, atol=1e-5)
restored = jlora.unmerge(merged, lora, cfg)
assert jax.tree_util.tree_all(
  jax.tree_util.tree_map(lambda a, b: jnp.allclose(a, b, atol=1e-6), restored, params)
)
print("wrapped apply == merged model; unmerge restores the base")
