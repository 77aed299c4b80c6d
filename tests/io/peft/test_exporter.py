"""`jlora.export_peft` (`jlora._src.io.peft.exporter`): keys, shapes and values of the files, name maps, and
PEFT loading them."""

import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests import _peft as P


def test_export_keys_shapes_and_values(tmp_path):
  tree = P.linen_tree()
  cfg = P.config(
    rank_pattern={"v_proj": 2}, alpha_pattern={"embed_tokens": 5.0}, modules_to_save=("lm_head",)
  )
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  pcfg = jlora.export_peft(tmp_path, lora, cfg)
  disk_cfg, tensors = P.read(tmp_path)
  assert disk_cfg == json.loads(json.dumps(pcfg))
  lp = lora["params"]["model"]
  q = f"{P.PREFIX}model.layers.1.self_attn.q_proj"
  # Independent expectation: PEFT's weights are the transposes of jlora's factors.
  np.testing.assert_array_equal(
    tensors[f"{q}.lora_A.weight"], np.asarray(lp["layers_1"]["self_attn"]["q_proj"]["kernel"]["lora_A"]).T
  )
  np.testing.assert_array_equal(
    tensors[f"{q}.lora_B.weight"], np.asarray(lp["layers_1"]["self_attn"]["q_proj"]["kernel"]["lora_B"]).T
  )
  assert tensors[f"{q}.lora_A.weight"].shape == (3, 8) and tensors[f"{q}.lora_B.weight"].shape == (6, 3)
  v = f"{P.PREFIX}model.layers.0.self_attn.v_proj"
  assert tensors[f"{v}.lora_A.weight"].shape == (2, 8) and tensors[f"{v}.lora_B.weight"].shape == (4, 2)
  e = f"{P.PREFIX}model.embed_tokens"
  assert tensors[f"{e}.lora_embedding_A"].shape == (3, 11) and tensors[f"{e}.lora_embedding_B"].shape == (
    8,
    3,
  )
  np.testing.assert_array_equal(
    tensors[f"{P.PREFIX}lm_head.weight"], np.asarray(lora["params"]["lm_head"]["kernel"]).T
  )
  assert len(tensors) == 2 * 5 + 1
  assert pcfg["r"] == 3 and pcfg["lora_alpha"] == 6 and pcfg["peft_type"] == "LORA"
  assert "model.layers.0.self_attn.q_proj" in pcfg["target_modules"]
  assert pcfg["rank_pattern"] == {
    "model\\.layers\\.0\\.self_attn\\.v_proj": 2,
    "model\\.layers\\.1\\.self_attn\\.v_proj": 2,
  }
  assert pcfg["alpha_pattern"] == {"model\\.embed_tokens": 5.0}
  assert pcfg["modules_to_save"] == ["lm_head"]
  with pytest.raises(FileExistsError, match="overwrite=True"):
    jlora.export_peft(tmp_path, lora, cfg)


def _dense_general_model(layers):
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.DenseGeneral((2, 3), name="q_proj")(x)  # kernel (d, H, Dh)
      return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="o_proj")(h)  # kernel (H, Dh, d)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(layers):
        x = Block(name=f"layers_{i}")(x)
      return x

  return Net()


def test_nd_kernels_flatten_row_major(tmp_path):
  model = _dense_general_model(2)
  x = jax.random.normal(jax.random.key(0), (2, 5))
  variables = model.init(jax.random.key(1), x)
  cfg = P.config(target_modules=("q_proj", "o_proj"), r=2)
  lora = jlora.init(variables, cfg, key=jax.random.key(2), apply_fn=model.apply, example_args=(x,))
  # o_proj (H, Dh, d) could be a convolution's kernel (*k, in, out): only the model's use tells
  with pytest.raises(ValueError, match="o_proj/kernel.*cannot tell which"):
    jlora.export_peft(tmp_path, lora, cfg)
  jlora.export_peft(tmp_path, lora, cfg, base=variables, apply_fn=model.apply, example_args=(x,))
  _, tensors = P.read(tmp_path)
  q = lora["params"]["layers_0"]["q_proj"]["kernel"]
  o = lora["params"]["layers_0"]["o_proj"]["kernel"]
  assert q["lora_B"].shape == (2, 2, 3) and o["lora_A"].shape == (2, 3, 2)
  # PEFT's Linear equivalent of the kernel reshaped (d, H*Dh) / (H*Dh, d).
  np.testing.assert_array_equal(
    tensors[f"{P.PREFIX}layers.0.q_proj.lora_B.weight"], np.asarray(q["lora_B"]).reshape(2, 6).T
  )
  np.testing.assert_array_equal(
    tensors[f"{P.PREFIX}layers.0.o_proj.lora_A.weight"], np.asarray(o["lora_A"]).reshape(6, 2).T
  )
  # Independent check of the flattening: a Linear with the reshaped merged kernel gives the model's output.
  kq = np.asarray(jlora.merge(variables, lora, cfg)["params"]["layers_0"]["q_proj"]["kernel"]).reshape(5, 6)
  dq = (
    tensors[f"{P.PREFIX}layers.0.q_proj.lora_B.weight"] @ tensors[f"{P.PREFIX}layers.0.q_proj.lora_A.weight"]
  ).T
  w0 = np.asarray(variables["params"]["layers_0"]["q_proj"]["kernel"]).reshape(5, 6)
  np.testing.assert_allclose(w0 + cfg.scale_for("layers_0/q_proj") * dq, kq, atol=1e-5)
  with pytest.raises(ValueError, match="apply_fn"):
    jlora.import_peft(tmp_path, variables)
  lora2, cfg2 = jlora.import_peft(tmp_path, variables, apply_fn=model.apply, example_args=(x,))
  chex.assert_trees_all_equal(lora2, lora)
  y = jlora.wrap(model.apply, cfg2)(variables, lora2, x)
  chex.assert_trees_all_close(y, model.apply(jlora.merge(variables, lora, cfg), x), atol=1e-5)


def test_stacked_kernels_export_per_layer(tmp_path):
  tree = {
    "params": {
      "model": {"layers": {"mlp": {"up_proj": {"kernel": jax.random.normal(jax.random.key(0), (4, 6, 5))}}}}
    }
  }
  cfg = P.config(target_modules=("up_proj",), layout_pattern={"up_proj": (1, 1)}, layers_to_transform=(1, 3))
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  a = lora["params"]["model"]["layers"]["mlp"]["up_proj"]["kernel"]["lora_A"]
  assert a.shape == (2, 6, 3)
  jlora.export_peft(tmp_path, lora, cfg)
  _, tensors = P.read(tmp_path)
  assert sorted(tensors) == sorted(
    f"{P.PREFIX}model.layers.{i}.mlp.up_proj.lora_{x}.weight" for i in (1, 3) for x in "AB"
  )
  np.testing.assert_array_equal(
    tensors[f"{P.PREFIX}model.layers.3.mlp.up_proj.lora_A.weight"], np.asarray(a[1]).T
  )
  lora2, cfg2 = jlora.import_peft(tmp_path, tree, layout_pattern={"up_proj": (1, 1)})
  assert cfg2.layers_to_transform == (1, 3)
  chex.assert_trees_all_equal(lora2, lora)


def test_custom_name_map(tmp_path):
  tree = P.linen_tree()
  cfg = P.config(target_modules=("q_proj",))
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  name_map = lambda path, layer: "transformer." + ".".join(str(p) for p in path[1:-1])  # noqa: E731
  jlora.export_peft(tmp_path, lora, cfg, name_map=name_map)
  _, tensors = P.read(tmp_path)
  assert f"{P.PREFIX}transformer.model.layers_0.self_attn.q_proj.lora_A.weight" in tensors
  with pytest.raises(ValueError, match=r"select no module of the base model.*`name_map`\? Some module names"):
    jlora.import_peft(tmp_path, tree)
  lora2, _ = jlora.import_peft(tmp_path, tree, name_map=name_map)
  chex.assert_trees_all_equal(lora2, lora)


def test_a_name_map_that_answers_no_module_name_is_an_error_naming_the_path(tmp_path):
  tree = P.linen_tree()
  cfg = P.config(target_modules=("q_proj",))
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  first = ("params", "model", "layers_0", "self_attn", "q_proj", "kernel")
  names = {first: "model.layers.0.self_attn.q_proj"}  # the other layer is missing: `.get` answers None
  for answer, layer, shown in ((names.get, 1, "None"), (lambda path, index: path, 0, r"\('params'")):
    where = f"'params/model/layers_{layer}/self_attn/q_proj/kernel'"
    with pytest.raises(
      ValueError,
      match=rf"`name_map` returned {shown}.* for the weight at {where}: it must return the PyTorch module "
      rf"name .* as a tuple of keys \(\('params', 'model', 'layers_{layer}'.* messages print it as {where}",
    ):
      jlora.export_peft(tmp_path, lora, cfg, name_map=answer)
  assert not os.listdir(tmp_path)  # nothing written


def test_a_weight_no_name_map_knows_is_an_error_naming_it(tmp_path):
  tree = {"blocks": {"attn": {"wq": {"w": jnp.ones((8, 4))}}}}
  cfg = jlora.LoraConfig(r=2, target_modules=("wq",))
  lora = jlora.init(tree, cfg, key=jax.random.key(0))
  with pytest.raises(
    ValueError, match=r"No PEFT name map jlora knows names the weight 'blocks/attn/wq/w'.*name_map="
  ):
    jlora.export_peft(tmp_path, lora, cfg, base=tree)
  pcfg = jlora.export_peft(tmp_path, lora, cfg, base=tree, name_map=lambda path, index: "model.wq")
  assert pcfg["target_modules"] == ["wq"]


@P.PEFT_WARNINGS
def test_short_target_modules_only_where_they_select_exactly_the_exported_modules(tmp_path):
  """Short names ['0', '2'] for attention/0 and attention/2 would also select the module
  encoder.stages.0 in PEFT (which refuses to adapt it): the export writes full names."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  keys = iter(jax.random.split(jax.random.key(4), 3))
  attn = {str(i): {"kernel": 0.5 * jax.random.normal(next(keys), (P.D, P.D))} for i in range(3)}
  tree = {"encoder": {"stages": {"0": {"attention": attn}}}}

  def apply(t, x):
    for i in range(3):
      x = jnp.tanh(x @ t["encoder"]["stages"]["0"]["attention"][str(i)]["kernel"])
    return x

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.encoder = torch.nn.Module()
      self.encoder.stages = torch.nn.ModuleList([torch.nn.Module()])
      self.encoder.stages[0].attention = torch.nn.ModuleList(
        torch.nn.Linear(P.D, P.D, bias=False) for _ in range(3)
      )
      with torch.no_grad():
        for i, lin in enumerate(self.encoder.stages[0].attention):
          lin.weight.copy_(torch.tensor(np.asarray(attn[str(i)]["kernel"]).T))

    def forward(self, x):
      for lin in self.encoder.stages[0].attention:
        x = torch.tanh(lin(x))
      return x

  cfg = jlora.LoraConfig(r=2, target_modules=("attention/0", "attention/2"), init_lora_weights=False)
  lora = jlora.init(tree, cfg, key=jax.random.key(5))
  name_map = lambda path, index: ".".join(map(str, path[:-1]))  # noqa: E731
  pcfg = jlora.export_peft(tmp_path, lora, cfg, base=tree, name_map=name_map, task_type=None)
  assert pcfg["target_modules"] == ["encoder.stages.0.attention.0", "encoder.stages.0.attention.2"]
  with torch.no_grad():
    theirs = peft.PeftModel.from_pretrained(Net(), str(tmp_path)).eval()(torch.tensor(P.XS)).numpy()
  ours = np.asarray(jlora.wrap(apply, cfg)(tree, lora, P.XS))
  assert np.abs(ours - apply(tree, P.XS)).max() > 1e-2
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
  # The short names, by hand: PEFT selects encoder.stages.0 too, and refuses it.
  written, tensors = P.read(tmp_path)
  P.rewrite(tmp_path, tensors, {**written, "target_modules": ["0", "2"]})
  with pytest.raises(ValueError, match=r"(?s)Target module Module\(.*\(attention\).* is not supported"):
    peft.PeftModel.from_pretrained(Net(), str(tmp_path))
