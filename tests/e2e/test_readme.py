"""The examples and commands of the README and the guides (docs/*.md) run as written; the quickstart too."""

import json
import os
import pathlib
import re
import runpy

import pytest

import tests
from tests import _launch

ROOT = pathlib.Path(tests.ROOT)
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Blocks under these (page, heading) pairs need several devices: each runs in a fresh interpreter on 8
# simulated CPU devices (the flag must be set before jax is imported, so not in this process).
MULTI_DEVICE_SECTIONS = {("docs/sharding.md", "Sharding")}


def _python_blocks() -> list[tuple[str, str, str]]:
  """``(page, section heading, code)`` for every ```python block of the README and the guides, in order.

  The heading is the nearest ``##`` heading above the block, else the page's ``#`` title.
  """
  blocks = []
  for path in PAGES:
    page = path.relative_to(ROOT).as_posix()
    heading, fence, code = "", None, []
    for line in path.read_text().splitlines(keepends=True):
      if fence is None and line.startswith("```"):
        fence, code = line.strip(), []
      elif fence is not None and line.strip() == "```":
        if fence == "```python":
          blocks.append((page, heading, "".join(code)))
        fence = None
      elif fence is not None:
        code.append(line)
      elif re.match(r"##? ", line):  # outside code: a `#` title or a `##` heading
        heading = line.lstrip("#").strip()
  return blocks


def test_readme_and_guides_have_the_examples_they_promise():
  where = [(page, heading) for page, heading, _ in _python_blocks()]
  assert where.count(("README.md", "Quick start")) == 1
  assert where.count(("docs/tour.md", "A tour")) == 1
  pages = [page for page, _ in where]
  assert where.count(("docs/frameworks.md", "Flax NNX")) == 1
  assert where.count(("docs/frameworks.md", "Flax's own attention")) == 1
  assert pages.count("docs/checkpoints.md") == 3  # checkpoints, a fresh process, name_map
  assert set(MULTI_DEVICE_SECTIONS) <= set(where)
  assert set(pages) >= {"docs/variants.md", "docs/qlora.md", "docs/adapters.md"}, pages
  assert len(where) >= 12, where
  for path in PAGES:
    assert "```text" not in path.read_text(), f"{path.name}: an example that is not run"


def test_readme_and_guides_python_blocks_run(capsys):
  out = []
  for page, heading, code in _python_blocks():
    if (page, heading) in MULTI_DEVICE_SECTIONS:
      continue
    exec(compile(code, f"{page} ({heading})", "exec"), {})
    out.append(capsys.readouterr().out)
  out = "".join(out)
  assert "trainable params: 1,024 || all params: 4,192 || trainable%: 24.4275" in out  # the tour
  assert "{'kernel': {'lora_A': (32, 8), 'lora_B': (8, 4, 8)}}" in out  # nn.MultiHeadDotProductAttention


def test_readme_quick_start_prints_what_it_says(capsys):
  quick_start = ("README.md", "Quick start")
  (code,) = [code for page, heading, code in _python_blocks() if (page, heading) == quick_start]
  assert 'target_modules=["q_proj", "v_proj"]' in code and "r=8, lora_alpha=16" in code
  assert "lora_dropout=0.1" in code
  assert len(code.strip().splitlines()) <= 20, "the quick start fits a glance"
  (promised,) = re.findall(r"^print\(.*\)\s+# (.*)$", code, re.M)
  exec(compile(code, "README.md (Quick start)", "exec"), {})
  assert capsys.readouterr().out.strip() == promised


@pytest.mark.parametrize("devices", [8, 1])
def test_sharding_block_runs_on_any_device_count(devices):
  (code,) = [code for page, heading, code in _python_blocks() if (page, heading) in MULTI_DEVICE_SECTIONS]
  # The simulated devices are CPU devices: on a machine with a GPU, jax would pick the GPU instead.
  flags = f"--xla_force_host_platform_device_count={devices}"
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  check = f"\nassert len(jax.devices()) == {devices}, jax.devices()\n"
  proc = _launch.python(["-c", code + check], env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "{'kernel': {'lora_A': P('fsdp', None), 'lora_B': P(None, 'tp')}}" in proc.stdout


def test_readme_setup_commands_match_ci():
  setup = re.search(r"## Set-up.*?```bash\n(.*?)```", README, re.S).group(1)
  lines = [ln.split("#")[0].strip() for ln in setup.strip().splitlines()]
  assert len(lines) == 2
  assert lines[1] == 'python -m pytest -q -m "not slow"', "the set-up runs the fast tests"
  ci = (ROOT / ".ci" / "run").read_text()
  assert "python3 " + lines[1].removeprefix("python ") in ci or lines[1] in ci
  slow = "python -m pytest -q -m slow"
  assert f"`{slow}`" in README, "the README names the end-to-end tests' command"
  assert "python3 " + slow.removeprefix("python ") in ci, "CI runs the end-to-end tests"


def test_readme_install_line_is_plain_and_notebooks_install_from_their_checkout():
  install = re.search(r"## Install.*?```bash\n(.*?)```", README, re.S).group(1)
  (line,) = [ln.split("#")[0].strip() for ln in install.strip().splitlines()]
  assert line == "pip install .", "the plain install takes no extras and names nothing outside the checkout"
  for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
    first_code = next(c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    source = "".join(first_code["source"])
    assert '"pip", "install"' in source and "pyproject.toml" in source, (
      f"{path.name}: its first cell must install jlora from the checkout it runs in"
    )
  for path in [*PAGES, *sorted((ROOT / "notebooks").glob("*.ipynb"))]:
    text = path.read_text()
    assert "git+" not in text and "colab.research.google.com/github" not in text, (
      f"{path.name} installs or opens jlora from a repository URL; jlora installs from a checkout"
    )


def test_quickstart_runs(capsys):
  runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
  out = capsys.readouterr().out
  assert "wrapped apply == merged model" in out
