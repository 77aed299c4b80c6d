"""The README's example and the quickstart script run as written."""

import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run(capsys):
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks, "README has no python example"
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {})
  out = capsys.readouterr().out
  assert "trainable params: 1,024 || all params: 4,192 || trainable%: 24.4275" in out


def test_readme_setup_commands_match_ci():
  text = (ROOT / "README.md").read_text()
  setup = re.search(r"## Set-up.*?```bash\n(.*?)```", text, re.S).group(1)
  lines = [ln.split("#")[0].strip() for ln in setup.strip().splitlines()]
  assert len(lines) == 2
  ci = (ROOT / ".ci" / "run").read_text()
  assert "python3 " + lines[1].removeprefix("python ") in ci or lines[1] in ci


def test_quickstart_runs(capsys):
  runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
  out = capsys.readouterr().out
  assert "wrapped apply == merged model" in out
