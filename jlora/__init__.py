"""jlora: functional LoRA for JAX and Flax.

Shape conventions: a kernel's `Layout` gives each axis a role, stacked,
fan-in or fan-out, in any storage order (a Flax Dense kernel ``(in, out)`` is
``"io"``). Its adapter keeps the kernel's axis order: ``lora_A`` is the kernel
with its fan-out axes replaced by one rank axis, ``lora_B`` the kernel with its
fan-in axes replaced by one (Dense: A ``(in, r)``, B ``(r, out)``). PEFT's
``lora_A.weight`` is ``(r, in)`` and ``lora_B.weight`` is ``(out, r)``.
"""

from jlora._src.adapters.add_weighted import add_weighted
from jlora._src.adapters.bank import Bank, BankConfig, stack
from jlora._src.adapters.loraplus import loraplus, loraplus_labels
from jlora._src.adapters.merge import merge, unmerge
from jlora._src.adapters.quantize import QuantizedArray, dequantize, quantize
from jlora._src.adapters.sharding import adapter_specs
from jlora._src.api.initialize import init
from jlora._src.api.layout_inference import infer_layouts
from jlora._src.api.pissa import LoraWithResidual, init_with_residual, to_plain_lora
from jlora._src.api.wrap import wrap
from jlora._src.core.config import LoraConfig
from jlora._src.core.layouts import Layout
from jlora._src.core.targets import module_paths
from jlora._src.frameworks.nnx import nnx_merge, nnx_split
from jlora._src.frameworks.optim import combine, freeze_base, split, trainable_mask
from jlora._src.frameworks.summary import count_params, summary
from jlora._src.interpret.evaluator import MaterializationWarning
from jlora._src.io.checkpoint.bank import load_bank, save_bank
from jlora._src.io.checkpoint.lock import CheckpointBusyError, break_writer_lock
from jlora._src.io.checkpoint.manager import (
  AdapterCheckpointManager,
  RestoredAdapter,
  load_adapter,
  save_adapter,
)
from jlora._src.io.merged import save_merged
from jlora._src.io.peft.exporter import export_peft
from jlora._src.io.peft.importer import import_peft
from jlora._src.io.peft.names import PeftParameter, peft_module_name

# The one place the version is written: pyproject.toml reads it from here (`[tool.setuptools.dynamic]`).
__version__ = "0.1.0"

__all__ = [
  "AdapterCheckpointManager",
  "Bank",
  "BankConfig",
  "CheckpointBusyError",
  "Layout",
  "LoraConfig",
  "LoraWithResidual",
  "MaterializationWarning",
  "PeftParameter",
  "QuantizedArray",
  "RestoredAdapter",
  "adapter_specs",
  "add_weighted",
  "break_writer_lock",
  "combine",
  "count_params",
  "dequantize",
  "export_peft",
  "freeze_base",
  "import_peft",
  "infer_layouts",
  "init",
  "init_with_residual",
  "load_adapter",
  "load_bank",
  "loraplus",
  "loraplus_labels",
  "merge",
  "module_paths",
  "nnx_merge",
  "nnx_split",
  "peft_module_name",
  "quantize",
  "save_adapter",
  "save_bank",
  "save_merged",
  "split",
  "stack",
  "summary",
  "to_plain_lora",
  "trainable_mask",
  "unmerge",
  "wrap",
]
