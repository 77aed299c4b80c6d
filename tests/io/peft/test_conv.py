"""PEFT's ConvNd LoRA (`jlora._src.io.peft.conv`) against PEFT on PyTorch with the same base weights.

A small CNN in Flax (``nn.Conv`` kernels ``(*k, in, out)``, NHWC; a 'SAME' and
a 'VALID' convolution, global average pooling, a Dense head) and its PyTorch
twin (``nn.Conv1d``/``nn.Conv2d`` weights ``(out, in, *k)``, NCHW). PEFT's
``lora_A.weight`` is ``(r, in, *k)``, ``lora_B.weight`` ``(out, r, 1, ...)``,
DoRA's ``lora_magnitude_vector`` ``(1, out, 1, ...)``. PEFT -> jlora and
jlora -> PEFT outputs agree to atol 1e-5 (float32, CPU); a round trip
reproduces the adapter tree exactly. Needs torch and peft; skipped otherwise.
Hugging Face models' convolutions (ResNet, ViT, Wav2Vec2) against PEFT:
`tests/e2e/test_peft_conv_families.py`.
"""

import json
import os
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import jlora

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from jlora._src.io.peft import conv as peft_conv  # noqa: E402

PREFIX = "base_model.model."
R, ALPHA, ATOL = 2, 4, 1e-5
CONVS = ("conv1", "conv2")


@pytest.mark.parametrize("spatial", [1, 2, 3])
def test_factors_give_the_delta_peft_computes(spatial):
  """`peft_conv.to_peft` against PEFT's own ``get_delta_weight`` of a ConvNd layer; `from_peft` inverts it."""
  cin, cout, k = 3, 5, (3, 2, 4)[:spatial]
  rng = np.random.default_rng(spatial)
  a, b, m = rng.normal(size=k + (cin, R)), rng.normal(size=(R, cout)), rng.normal(size=(cout,))
  la, lb, lm = peft_conv.to_peft(a, b, m)
  kernel = k + (cin, cout)
  assert (la.shape, lb.shape) == peft_conv.peft_shapes(kernel, R) and lm.shape == peft_conv.magnitude_shape(
    kernel
  )
  conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[spatial](cin, cout, k)
  holder = torch.nn.Module()
  holder.conv = conv
  layer = peft.get_peft_model(
    holder, peft.LoraConfig(r=R, lora_alpha=R, target_modules=["conv"])
  ).base_model.model.conv
  with torch.no_grad():
    layer.lora_A["default"].weight.copy_(torch.tensor(la, dtype=torch.float32))
    layer.lora_B["default"].weight.copy_(torch.tensor(lb, dtype=torch.float32))
  theirs = layer.get_delta_weight("default").detach().numpy()  # (out, in, *k), scale 1
  ours = np.einsum("...ir,ro->...io", a, b)  # the kernel's delta, (*k, in, out)
  np.testing.assert_allclose(
    theirs, ours.transpose(spatial + 1, spatial, *range(spatial)), rtol=1e-5, atol=1e-5
  )
  back_a, back_b = peft_conv.from_peft(la, lb)
  np.testing.assert_array_equal(back_a, a)
  np.testing.assert_array_equal(back_b, b)
  np.testing.assert_array_equal(lm.reshape(-1), m)


def test_layout_check():
  assert peft_conv.check_layout(jlora.Layout("iiio"), "c") == 2
  assert peft_conv.check_layout(jlora.Layout("siio"), "c") == 1
  for roles in ("oiii", "ioii", "io", "iiiiio", "ssiio"):
    with pytest.raises(ValueError, match=f"'c' has layout {roles}.*Flax's `nn.Conv`"):
      peft_conv.check_layout(jlora.Layout(roles), "c")


class CNN(nn.Module):
  spatial: int

  @nn.compact
  def __call__(self, x):  # (B, *spatial, C)
    k = (3,) * self.spatial
    x = nn.relu(nn.Conv(8, k, padding="SAME", name="conv1")(x))
    x = nn.Conv(6, k, padding="VALID", name="conv2")(x)
    return nn.Dense(5, name="fc")(x.mean(axis=tuple(range(1, 1 + self.spatial))))


class TorchCNN(torch.nn.Module):
  def __init__(self, spatial):
    super().__init__()
    conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d}[spatial]
    self.conv1 = conv(3, 8, 3, padding=1)
    self.conv2 = conv(8, 6, 3)
    self.fc = torch.nn.Linear(6, 5)

  def forward(self, x):  # (B, *spatial, C), as the Flax model takes it
    x = torch.relu(self.conv1(x.movedim(-1, 1)))
    x = self.conv2(x)
    return self.fc(x.mean(dim=tuple(range(2, x.ndim))))


def _flax(spatial):
  model = CNN(spatial)
  x = jax.random.normal(jax.random.key(0), (2,) + (7,) * spatial + (3,))
  keys = iter(jax.random.split(jax.random.key(1), 20))
  variables = jax.tree_util.tree_map(  # non-trivial biases
    lambda v: v + 0.1 * jax.random.normal(next(keys), v.shape), model.init(jax.random.key(2), x)
  )
  return model, variables, x


def _torch_twin(variables, spatial):
  """The PyTorch model with the Flax weights: HWIO -> OIHW, (in, out) -> (out, in)."""
  m = TorchCNN(spatial).eval()
  p = jax.tree_util.tree_map(np.asarray, variables["params"])
  n = spatial + 2
  with torch.no_grad():
    for name in CONVS:
      getattr(m, name).weight.copy_(torch.tensor(p[name]["kernel"].transpose(n - 1, n - 2, *range(n - 2))))
      getattr(m, name).bias.copy_(torch.tensor(p[name]["bias"]))
    m.fc.weight.copy_(torch.tensor(p["fc"]["kernel"].T))
    m.fc.bias.copy_(torch.tensor(p["fc"]["bias"]))
  return m


def _run(m, x):
  with torch.no_grad():
    return m(torch.tensor(np.asarray(x))).numpy()


def _peft_model(variables, spatial, dora):
  """A PEFT model on the twin, its factors and magnitudes moved off their init (B != 0, m != norms)."""
  torch.manual_seed(0)
  cfg = peft.LoraConfig(
    r=R, lora_alpha=ALPHA, target_modules=list(CONVS), use_dora=dora, init_lora_weights=False
  )
  pm = peft.get_peft_model(_torch_twin(variables, spatial), cfg)
  with torch.no_grad():
    for name, param in pm.named_parameters():
      if "lora_" in name:
        param.mul_(1 + 0.3 * torch.cos(torch.arange(param.numel(), dtype=torch.float32)).reshape(param.shape))
  return pm.eval()


def _jlora_adapter(model, variables, x, dora, targets=CONVS + ("fc",)):
  cfg = jlora.LoraConfig(
    r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False, use_dora=dora
  )
  lora = jlora.init(variables, cfg, key=jax.random.key(3), apply_fn=model.apply, example_args=(x,))
  lora = jax.tree_util.tree_map_with_path(  # a trained magnitude: off the kernel norms
    lambda kp, v: (
      v * (1 + 0.2 * jnp.cos(jnp.arange(v.size)).reshape(v.shape))
      if str(kp[-1].key) == "lora_magnitude"
      else v
    ),
    lora,
  )
  return lora, cfg


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("spatial", [1, 2], ids=["conv1d", "conv2d"])
def test_peft_adapter_imports_with_the_same_outputs(tmp_path, spatial, dora):
  model, variables, x = _flax(spatial)
  pm = _peft_model(variables, spatial, dora)
  pm.save_pretrained(tmp_path)
  want = _run(pm, x)
  lora, cfg = jlora.import_peft(tmp_path, variables, name_map=jlora.peft_module_name)
  # the tensor shapes say these are convolutions; the model's use says the same
  lora_used, cfg_used = jlora.import_peft(
    tmp_path, variables, name_map=jlora.peft_module_name, apply_fn=model.apply, example_args=(x,)
  )
  chex.assert_trees_all_equal(lora, lora_used)
  assert cfg == cfg_used and cfg.use_dora == dora
  k = spatial + 1
  conv1 = lora["params"]["conv1"]["kernel"]
  assert conv1["lora_A"].shape == (3,) * spatial + (3, R) and conv1["lora_B"].shape == (R, 8)
  torch_a = pm.base_model.model.conv1.lora_A["default"].weight.detach().numpy()  # (r, in, *k)
  np.testing.assert_array_equal(np.asarray(conv1["lora_A"]), torch_a.transpose(*range(2, k + 1), 1, 0))
  got = np.asarray(jlora.wrap(model.apply, cfg)(variables, lora, x))
  diff = np.abs(got - want).max()
  print(f"conv{spatial}d {'dora' if dora else 'lora'}: PEFT -> jlora max abs diff {diff:.2e}")
  assert diff < ATOL
  base_diff = np.abs(np.asarray(model.apply(variables, x)) - _run(_torch_twin(variables, spatial), x)).max()
  assert base_diff < ATOL and np.abs(got - np.asarray(model.apply(variables, x))).max() > 1e-3


def _export(directory, lora, cfg, *, model, variables, x):
  """``lora`` exported in PEFT's format with PyTorch's module names, read off the model; its tensors."""
  jlora.export_peft(
    directory,
    lora,
    cfg,
    base=variables,
    name_map=jlora.peft_module_name,
    apply_fn=model.apply,
    example_args=(x,),
    task_type=None,
  )
  return safetensors.numpy.load_file(os.path.join(directory, "adapter_model.safetensors"))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("spatial", [1, 2], ids=["conv1d", "conv2d"])
def test_export_loads_in_peft_with_the_same_outputs(tmp_path, spatial, dora):
  model, variables, x = _flax(spatial)
  lora, cfg = _jlora_adapter(model, variables, x, dora)
  tensors = _export(tmp_path, lora, cfg, model=model, variables=variables, x=x)
  ones = (1,) * spatial
  assert tensors[f"{PREFIX}conv2.lora_A.weight"].shape == (R, 8) + (3,) * spatial
  assert tensors[f"{PREFIX}conv2.lora_B.weight"].shape == (6, R) + ones
  assert tensors[f"{PREFIX}fc.lora_A.weight"].shape == (R, 6)  # the Dense head stays a Linear
  if dora:
    assert tensors[f"{PREFIX}conv2.lora_magnitude_vector"].shape == (1, 6) + ones
    assert tensors[f"{PREFIX}fc.lora_magnitude_vector"].shape == (5,)
  pm = peft.PeftModel.from_pretrained(_torch_twin(variables, spatial), str(tmp_path)).eval()
  got = np.asarray(jlora.wrap(model.apply, cfg)(variables, lora, x))
  diff = np.abs(_run(pm, x) - got).max()
  print(f"conv{spatial}d {'dora' if dora else 'lora'}: jlora -> PEFT max abs diff {diff:.2e}")
  assert diff < ATOL
  assert np.abs(got - np.asarray(model.apply(variables, x))).max() > 1e-3  # the adapter does something
  back, cfg_back = jlora.import_peft(tmp_path, variables, name_map=jlora.peft_module_name)
  chex.assert_trees_all_equal(back, lora)
  assert cfg_back.use_dora == dora and cfg_back.r == R and cfg_back.lora_alpha == ALPHA


def test_summary_counts_as_peft(tmp_path):
  model, variables, x = _flax(2)
  for dora in (False, True):
    pm = _peft_model(variables, 2, dora)
    pm.save_pretrained(tmp_path / str(dora))
    lora, cfg = jlora.import_peft(tmp_path / str(dora), variables, name_map=jlora.peft_module_name)
    trainable, total = pm.get_nb_trainable_parameters()
    pct = 100 * trainable / total
    want = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"
    assert jlora.summary(variables, lora, cfg) == want


class _Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="conv")(h)), None


class ScannedCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
    return stack(name="layers")(x, None)[0].mean(axis=(1, 2))


class TorchScannedCNN(torch.nn.Module):
  def __init__(self, kernels, biases):
    super().__init__()
    self.layers = torch.nn.ModuleList()
    for k, b in zip(kernels, biases):
      block = torch.nn.Module()
      block.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
      with torch.no_grad():
        block.conv.weight.copy_(torch.tensor(k.transpose(3, 2, 0, 1)))
        block.conv.bias.copy_(torch.tensor(b))
      self.layers.append(block)

  def forward(self, x):
    x = x.movedim(-1, 1)
    for block in self.layers:
      x = torch.relu(block.conv(x))
    return x.mean(dim=(2, 3))


def test_scanned_conv_is_one_peft_module_per_layer(tmp_path):
  model = ScannedCNN()
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 4))
  variables = model.init(jax.random.key(1), x)
  conv = variables["params"]["layers"]["conv"]
  assert conv["kernel"].shape == (2, 3, 3, 4, 4)
  cfg = jlora.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=("conv",), init_lora_weights=False)
  lora = jlora.init(variables, cfg, key=jax.random.key(2), apply_fn=model.apply, example_args=(x,))
  jlora.export_peft(
    tmp_path, lora, cfg, base=variables, apply_fn=model.apply, example_args=(x,), task_type=None
  )
  tensors = safetensors.numpy.load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  assert {k: v.shape for k, v in tensors.items()} == {
    f"{PREFIX}layers.{i}.conv.lora_{ab}.weight": shape
    for i in range(2)
    for ab, shape in (("A", (R, 4, 3, 3)), ("B", (4, R, 1, 1)))
  }
  twin = TorchScannedCNN(np.asarray(conv["kernel"]), np.asarray(conv["bias"])).eval()
  pm = peft.PeftModel.from_pretrained(twin, str(tmp_path)).eval()
  got = np.asarray(jlora.wrap(model.apply, cfg)(variables, lora, x))
  diff = np.abs(_run(pm, x) - got).max()
  print(f"scanned conv2d: jlora -> PEFT max abs diff {diff:.2e}")
  assert diff < ATOL
  back, _ = jlora.import_peft(tmp_path, variables)
  chex.assert_trees_all_equal(back, lora)


def test_an_all_linear_file_on_a_cnn_imports_without_the_model(tmp_path):
  """PEFT's "all-linear" adapts the Linear (fc), not the convolutions; jlora cannot tell a conv kernel of
  unknown layout from a DenseGeneral's, so it takes one as linear only where the file adapts it so."""
  model, variables, x = _flax(2)
  torch.manual_seed(1)
  cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)
  pm = peft.get_peft_model(_torch_twin(variables, 2), cfg).eval()
  pm.save_pretrained(tmp_path / "saved")  # PEFT writes the expanded list, ["fc"]
  _edited(tmp_path / "saved", tmp_path / "d", lambda t: t, target_modules="all-linear")  # as a user writes it
  lora, jcfg = jlora.import_peft(tmp_path / "d", variables, name_map=jlora.peft_module_name)
  assert set(lora["params"]) == {"fc"}
  got = np.asarray(jlora.wrap(model.apply, jcfg)(variables, lora, x))
  assert np.abs(got - model.apply(variables, x)).max() > 1e-3
  np.testing.assert_allclose(got, _run(pm, x), atol=ATOL, rtol=0)


# -- error paths -------------------------------------------------------------------------------


def test_export_without_the_model_refuses_a_kernel_shapes_cannot_tell(tmp_path):
  model, variables, x = _flax(2)
  lora, cfg = _jlora_adapter(model, variables, x, dora=False)
  for base in (variables, None):
    with pytest.raises(ValueError, match=r"params/conv1/kernel.*cannot tell which.*apply_fn=model.apply"):
      jlora.export_peft(tmp_path, lora, cfg, base=base, name_map=jlora.peft_module_name)
  assert not os.listdir(tmp_path)
  with pytest.raises(ValueError, match="`apply_fn` is given without `base`"):
    jlora.export_peft(tmp_path, lora, cfg, name_map=jlora.peft_module_name, apply_fn=model.apply)


def test_dense_general_is_exported_as_a_linear_with_the_model(tmp_path):
  class Attn(nn.Module):
    @nn.compact
    def __call__(self, x):  # (B, heads, head_dim) -> (B, d)
      return nn.DenseGeneral(6, axis=(-2, -1), name="o_proj")(x)

  model, x = Attn(), jnp.ones((2, 3, 4))
  variables = model.init(jax.random.key(0), x)
  cfg = jlora.LoraConfig(r=R, target_modules=("o_proj",), init_lora_weights=False)
  lora = jlora.init(variables, cfg, key=jax.random.key(1), apply_fn=model.apply, example_args=(x,))
  with pytest.raises(ValueError, match="cannot tell which"):
    jlora.export_peft(tmp_path, lora, cfg, base=variables, name_map=jlora.peft_module_name)
  jlora.export_peft(
    tmp_path,
    lora,
    cfg,
    base=variables,
    name_map=jlora.peft_module_name,
    apply_fn=model.apply,
    example_args=(x,),
  )
  tensors = safetensors.numpy.load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  a = np.asarray(lora["params"]["o_proj"]["kernel"]["lora_A"])  # (3, 4, r)
  np.testing.assert_array_equal(tensors[f"{PREFIX}o_proj.lora_A.weight"], a.reshape(12, R).T)


def test_conv_kernel_in_another_storage_order_is_refused(tmp_path):
  def apply_fn(params, x):  # a kernel stored (out, in, h, w), as PyTorch stores it
    dn = ("NHWC", "OIHW", "NHWC")
    return jax.lax.conv_general_dilated(x, params["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=dn)

  params = {"conv": {"kernel": jax.random.normal(jax.random.key(0), (8, 3, 3, 3))}}
  x = jnp.ones((1, 5, 5, 3))
  cfg = jlora.LoraConfig(r=R, target_modules=("conv",), init_lora_weights=False)
  lora = jlora.init(params, cfg, key=jax.random.key(1), apply_fn=apply_fn, example_args=(x,))
  with pytest.raises(ValueError, match=r"'conv/kernel' has layout oiii.*\(\*kernel_size, in, out\)"):
    jlora.export_peft(
      tmp_path, lora, cfg, base=params, name_map=lambda p, i: "conv", apply_fn=apply_fn, example_args=(x,)
    )


def test_export_reads_only_the_adapted_kernels_off_the_model(tmp_path):
  class WithGrouped(nn.Module):  # a grouped convolution, which jlora cannot adapt, beside an adapted one
    @nn.compact
    def __call__(self, x):
      return nn.Conv(4, (3, 3), feature_group_count=2, name="dw")(nn.Conv(4, (3, 3), name="conv1")(x))

  model, x = WithGrouped(), jnp.ones((1, 5, 5, 2))
  variables = model.init(jax.random.key(0), x)
  cfg = jlora.LoraConfig(r=R, target_modules=("conv1",), init_lora_weights=False)
  lora = jlora.init(variables, cfg, key=jax.random.key(1), apply_fn=model.apply, example_args=(x,))
  jlora.export_peft(
    tmp_path,
    lora,
    cfg,
    base=variables,
    name_map=jlora.peft_module_name,
    apply_fn=model.apply,
    example_args=(x,),
  )
  tensors = safetensors.numpy.load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  assert tensors[f"{PREFIX}conv1.lora_A.weight"].shape == (R, 2, 3, 3)


class GroupedCNN(nn.Module):  # a grouped convolution beside a plain one
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), padding="SAME", name="conv1")(x))
    x = nn.Conv(8, (3, 3), padding="SAME", feature_group_count=2, name="grouped")(x)
    return nn.Dense(5, name="fc")(x.mean(axis=(1, 2)))


class TorchGroupedCNN(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
    self.grouped = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)  # weight (8, 4, 3, 3)
    self.fc = torch.nn.Linear(8, 5)

  def forward(self, x):  # (B, H, W, C), as the Flax model takes it
    x = self.grouped(torch.relu(self.conv1(x.movedim(-1, 1))))
    return self.fc(x.mean(dim=(2, 3)))


def _grouped():
  """`GroupedCNN`, its variables (non-trivial biases), an input, and its PyTorch twin (same weights)."""
  model, x = GroupedCNN(), jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  keys = iter(jax.random.split(jax.random.key(1), 20))
  variables = jax.tree_util.tree_map(
    lambda v: v + 0.1 * jax.random.normal(next(keys), v.shape), model.init(jax.random.key(2), x)
  )
  twin, p = TorchGroupedCNN().eval(), jax.tree_util.tree_map(np.asarray, variables["params"])
  with torch.no_grad():
    for name in ("conv1", "grouped"):
      getattr(twin, name).weight.copy_(torch.tensor(p[name]["kernel"].transpose(3, 2, 0, 1)))
      getattr(twin, name).bias.copy_(torch.tensor(p[name]["bias"]))
    twin.fc.weight.copy_(torch.tensor(p["fc"]["kernel"].T))
    twin.fc.bias.copy_(torch.tensor(p["fc"]["bias"]))
  assert np.abs(_run(twin, x) - np.asarray(model.apply(variables, x))).max() < ATOL
  return model, variables, x, twin


def test_import_with_the_model_reads_only_the_kernels_the_file_adapts(tmp_path):
  model, variables, x, twin = _grouped()
  torch.manual_seed(0)
  cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["conv1", "fc"], init_lora_weights=False)
  pm = peft.get_peft_model(twin, cfg).eval()
  pm.save_pretrained(tmp_path)
  want = _run(pm, x)
  lora, jcfg = jlora.import_peft(tmp_path, variables, name_map=jlora.peft_module_name)
  # the grouped convolution the file leaves alone gives no layout, which is no error
  lora_used, jcfg_used = jlora.import_peft(
    tmp_path, variables, name_map=jlora.peft_module_name, apply_fn=model.apply, example_args=(x,)
  )
  chex.assert_trees_all_equal(lora, lora_used)
  assert jcfg == jcfg_used and "grouped" not in lora_used["params"]
  got = np.asarray(jlora.wrap(model.apply, jcfg_used)(variables, lora_used, x))
  assert np.abs(got - np.asarray(model.apply(variables, x))).max() > 1e-3
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_a_grouped_conv_matches_peft_both_ways(tmp_path):
  # PEFT adapts Conv2d(8, 8, 3, groups=2) with lora_A Conv2d(8, r, 3) and lora_B Conv2d(r, 8, 1, groups=2)
  model, variables, x, twin = _grouped()
  torch.manual_seed(0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # PEFT's warning that it cannot merge a grouped conv's adapter
    pcfg = peft.LoraConfig(
      r=R, lora_alpha=ALPHA, target_modules=["conv1", "grouped"], init_lora_weights=False
    )
    pm = peft.get_peft_model(twin, pcfg).eval()
  pm.save_pretrained(tmp_path / "peft")
  want = _run(pm, x)
  lora, cfg = jlora.import_peft(
    tmp_path / "peft", variables, name_map=jlora.peft_module_name, apply_fn=model.apply, example_args=(x,)
  )
  grouped = lora["params"]["grouped"]["kernel"]
  assert grouped["lora_A"].shape == (3, 3, 8, R) and grouped["lora_B"].shape == (R // 2, 8)
  got = np.asarray(jlora.wrap(model.apply, cfg)(variables, lora, x))
  assert np.abs(got - np.asarray(model.apply(variables, x))).max() > 1e-3
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  # without the model, the factor shapes alone tell the grouped layout
  lora_shapes, _ = jlora.import_peft(tmp_path / "peft", variables, name_map=jlora.peft_module_name)
  chex.assert_trees_all_equal(lora_shapes, lora)
  np.testing.assert_allclose(jlora.wrap(model.apply, cfg)(variables, lora_shapes, x), want, atol=ATOL, rtol=0)
  # jlora -> PEFT: a fresh jlora adapter, trained-like (nonzero B), loads in PEFT with the same outputs
  cfg = jlora.LoraConfig(r=4, lora_alpha=ALPHA, target_modules=("conv1", "grouped"), init_lora_weights=False)
  mine = jlora.init(variables, cfg, key=jax.random.key(3), apply_fn=model.apply, example_args=(x,))
  tensors = _export(tmp_path / "jlora", mine, cfg, model=model, variables=variables, x=x)
  assert tensors[f"{PREFIX}grouped.lora_A.weight"].shape == (4, 8, 3, 3)
  assert tensors[f"{PREFIX}grouped.lora_B.weight"].shape == (8, 2, 1, 1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pm = peft.PeftModel.from_pretrained(_grouped()[3], str(tmp_path / "jlora")).eval()
  got = np.asarray(jlora.wrap(model.apply, cfg)(variables, mine, x))
  np.testing.assert_allclose(got, _run(pm, x), atol=ATOL, rtol=0)
  back, _ = jlora.import_peft(tmp_path / "jlora", variables, name_map=jlora.peft_module_name)
  chex.assert_trees_all_equal(back, mine)


def test_a_grouped_conv_refuses_what_peft_refuses():
  model, variables, x, twin = _grouped()
  read = dict(apply_fn=model.apply, example_args=(x,))
  cfg = jlora.LoraConfig(r=3, target_modules=("grouped",))
  with pytest.raises(
    ValueError, match=r"'params/grouped/kernel'.*rank 3 is not a multiple of 2.*rank_pattern"
  ):
    jlora.init(variables, cfg, key=jax.random.key(1), **read)
  with (
    warnings.catch_warnings(),
    pytest.raises(ValueError, match=r"Targeting a Conv2d with groups=2 and rank 3"),
  ):
    warnings.simplefilter("ignore")  # PEFT's own refusal, after its warning that it cannot merge
    peft.get_peft_model(twin, peft.LoraConfig(r=3, target_modules=["grouped"]))
  cfg = jlora.LoraConfig(r=R, target_modules=("grouped",), use_dora=True)
  with pytest.raises(ValueError, match=r"'params/grouped/kernel'.*grouped convolution.*DoRA.*use_dora=False"):
    jlora.init(variables, cfg, key=jax.random.key(1), **read)
  cfg = jlora.LoraConfig(r=R, target_modules=("conv1", "grouped"), init_lora_weights=False)
  lora = jlora.init(variables, cfg, key=jax.random.key(1), **read)
  cannot = r"'params/grouped/kernel' adapts a grouped convolution.*cannot be merged.*PEFT refuses"
  with pytest.raises(ValueError, match=cannot):
    jlora.merge(variables, lora, cfg)
  with warnings.catch_warnings(), pytest.raises(NotImplementedError, match="Merging is not supported"):
    warnings.simplefilter("ignore")
    peft.get_peft_model(twin, peft.LoraConfig(r=R, target_modules=["grouped"])).merge_adapter()
  # the kernel used other than in its grouped convolution: the update cannot be formed
  flat = lambda v, x: model.apply(v, x) + v["params"]["grouped"]["kernel"].sum()  # noqa: E731
  with pytest.raises(ValueError, match=cannot):
    jlora.wrap(flat, cfg)(variables, lora, x)


def _edited(src, dst, edit, **config):
  """A copy of a PEFT adapter directory with its tensors edited (PEFT writes no jlora checksum), and
  ``config`` fields replaced."""
  os.makedirs(dst)
  with open(os.path.join(src, "adapter_config.json")) as f:
    pcfg = {**json.load(f), **config}
  with open(os.path.join(dst, "adapter_config.json"), "w") as g:
    json.dump(pcfg, g)
  tensors = safetensors.numpy.load_file(os.path.join(src, "adapter_model.safetensors"))
  safetensors.numpy.save_file(edit(tensors), os.path.join(dst, "adapter_model.safetensors"))


def test_import_refuses_wrong_conv_tensors(tmp_path):
  model, variables, x = _flax(2)
  _peft_model(variables, 2, dora=True).save_pretrained(tmp_path / "ok")
  key_a = f"{PREFIX}conv2.lora_A.weight"

  def cases():
    yield (
      "k",
      lambda t: {**t, key_a: t[key_a][:, :, :2, :2]},
      r"conv2.lora_A.weight.*\(2, 8, 2, 2\).*needs \(2, 8, 3, 3\)",
    )
    mag = f"{PREFIX}conv2.lora_magnitude_vector"
    yield "m", lambda t: {**t, mag: t[mag].reshape(-1)}, r"lora_magnitude_vector.*magnitude is \(1, 6, 1, 1\)"
    fc = f"{PREFIX}fc.lora_"
    conv_on_fc = {
      fc + "A.weight": np.ones((R, 6, 1, 1), np.float32),
      fc + "B.weight": np.ones((5, R, 1, 1), np.float32),
    }
    yield (
      "fc",
      lambda t: {**t, **conv_on_fc},
      r"fc.lora_A.weight.*PEFT ConvNd adapter.*'params/fc/kernel' has layout io",
    )

  for name, edit, match in cases():
    # fc's tensors count only where the config selects fc (else PEFT ignores them, and jlora warns)
    fields = {"target_modules": ["conv1", "conv2", "fc"]} if name == "fc" else {}
    _edited(tmp_path / "ok", tmp_path / name, edit, **fields)
    with pytest.raises(ValueError, match=match):
      jlora.import_peft(tmp_path / name, variables, name_map=jlora.peft_module_name)
  # the model's use: a 2-D Linear tensor on a convolution kernel
  _edited(tmp_path / "ok", tmp_path / "flat", lambda t: {**t, key_a: t[key_a].reshape(R, -1)})
  with pytest.raises(ValueError, match=r"\(2, 72\).*needs \(2, 8, 3, 3\).*ConvNd"):
    jlora.import_peft(
      tmp_path / "flat", variables, name_map=jlora.peft_module_name, apply_fn=model.apply, example_args=(x,)
    )


def test_a_dilated_conv_has_no_peft_format(tmp_path):
  """PEFT's ConvNd ``lora_A`` ignores the base's dilation: no PEFT file computes a dilated conv's adapter."""

  class Dilated(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(4, (3, 3), kernel_dilation=2, name="conv1")(x)

  model, x = Dilated(), jnp.ones((1, 9, 9, 3))
  params = model.init(jax.random.key(0), x)
  cfg = jlora.LoraConfig(r=R, target_modules=("conv1",))
  lora = jlora.init(params, cfg, key=jax.random.key(1), apply_fn=model.apply, example_args=(x,))
  (layout,) = jlora.infer_layouts(model.apply, params, x).values()
  assert layout.ops >= {"conv_general_dilated"}
  with pytest.raises(
    ValueError, match=r"'params/conv1/kernel' is used with a dilated kernel.*not its dilation"
  ):
    jlora.export_peft(
      tmp_path / "a", lora, cfg, base=params, name_map=lambda p, i: "conv1", apply_fn=model.apply,
      example_args=(x,),
    )  # fmt: skip
  undilated = nn.Conv(4, (3, 3), name="conv1")  # the same kernel shape: its file is a valid ConvNd adapter
  apply_plain = lambda p, x: undilated.apply({"params": p["params"]["conv1"]}, x)  # noqa: E731
  jlora.export_peft(
    tmp_path / "b", lora, cfg, base=params, name_map=lambda p, i: "conv1", apply_fn=apply_plain,
    example_args=(x,),
  )  # fmt: skip
  with pytest.raises(ValueError, match=r"a PEFT ConvNd adapter: .*used with a dilated kernel"):
    jlora.import_peft(
      tmp_path / "b", params, name_map=lambda p, i: "conv1", apply_fn=model.apply, example_args=(x,)
    )
