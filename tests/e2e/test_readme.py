"""The README's examples and commands run as written, and the quickstart script too."""

import json
import os
import pathlib
import re
import runpy
import subprocess
import sys

import pytest

import tests

ROOT = pathlib.Path(tests.ROOT)
README = (ROOT / "README.md").read_text()
# Blocks under these headings need several devices: each runs in a fresh interpreter on 8 simulated CPU
# devices (the flag must be set before jax is imported, so not in this process).
MULTI_DEVICE_SECTIONS = {"Sharding"}


def _python_blocks() -> list[tuple[str, str]]:
  """``(section heading, code)`` for every ```python block of the README, in order."""
  blocks = []
  for section in re.split(r"^## ", README, flags=re.M)[1:]:
    heading = section.splitlines()[0].strip()
    blocks += [(heading, code) for code in re.findall(r"```python\n(.*?)```", section, re.S)]
  return blocks


def test_readme_has_the_examples_it_promises():
  headings = [h for h, _ in _python_blocks()]
  assert headings.count("Frameworks") == 2  # NNX, Flax attention
  assert headings.count("Checkpoints and sharing adapters") == 3  # checkpoints, a fresh process, name_map
  assert "Sharding" in headings
  assert "```text" not in README, "a README example that is not run"


def test_readme_python_blocks_run(capsys):
  out = []
  for heading, code in _python_blocks():
    if heading in MULTI_DEVICE_SECTIONS:
      continue
    exec(compile(code, f"README.md ({heading})", "exec"), {})
    out.append(capsys.readouterr().out)
  out = "".join(out)
  assert "trainable params: 1,024 || all params: 4,192 || trainable%: 24.4275" in out
  assert "{'kernel': {'lora_A': (32, 8), 'lora_B': (8, 4, 8)}}" in out  # nn.MultiHeadDotProductAttention


@pytest.mark.parametrize("devices", [8, 1])
def test_readme_sharding_block_runs_on_any_device_count(devices):
  (code,) = [code for heading, code in _python_blocks() if heading in MULTI_DEVICE_SECTIONS]
  # The simulated devices are CPU devices: on a machine with a GPU, jax would pick the GPU instead.
  flags = f"--xla_force_host_platform_device_count={devices}"
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  check = f"\nassert len(jax.devices()) == {devices}, jax.devices()\n"
  proc = subprocess.run(
    [sys.executable, "-c", code + check],
    check=False,
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "{'kernel': {'lora_A': P('fsdp', None), 'lora_B': P(None, 'tp')}}" in proc.stdout


def test_readme_setup_commands_match_ci():
  setup = re.search(r"## Set-up.*?```bash\n(.*?)```", README, re.S).group(1)
  lines = [ln.split("#")[0].strip() for ln in setup.strip().splitlines()]
  assert len(lines) == 2
  ci = (ROOT / ".ci" / "run").read_text()
  assert "python3 " + lines[1].removeprefix("python ") in ci or lines[1] in ci


def test_readme_install_line_is_plain_and_matches_the_notebooks():
  install = re.search(r"## Install.*?```bash\n(.*?)```", README, re.S).group(1)
  (line,) = [ln.split("#")[0].strip() for ln in install.strip().splitlines()]
  assert line.startswith("pip install ") and "[" not in line, "the plain install takes no extras"
  url = re.search(r"git\+https://\S+?\.git", line).group(0)
  for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
    first_code = next(c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    assert url in "".join(first_code["source"]), f"{path.name} installs jlora from elsewhere"


def test_quickstart_runs(capsys):
  runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
  out = capsys.readouterr().out
  assert "wrapped apply == merged model" in out
