"""The package's shape, read from the source (no jax, no compile): module and function sizes, stages that
import only downward, a test module beside every module, and slow tests in tests/e2e/ only.

A failure names each offender and the rule.
"""

import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "jlora" / "_src"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60  # lines of code: no docstrings, comments or blank lines
STAGES = ("core", "interpret", "adapters", "api", "io", "frameworks")  # each imports only from those before
# Modules whose tests live elsewhere, each with where.
NO_TEST_MODULE = {
  "core/agreement.py": "the adapter tree against the config: tests/adapters/test_bind.py, test_bad_inputs.py",
  "core/qarray.py": "the QuantizedArray protocol: tests/adapters/test_quantize.py",
  "api/initialize.py": "`jlora.init`: tests/adapters/test_create.py, tests/adapters/test_spec.py",
  "io/processes.py": "multi-process agreement: tests/e2e/test_pods.py (several processes)",
}


def _modules() -> list[Path]:
  return sorted(SRC.rglob("*.py"))


def _name(path: Path) -> str:
  return path.relative_to(SRC).as_posix()


def _code_lines(source: str) -> set[int]:
  """The lines that hold a token other than a comment or a line break."""
  skip = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENDMARKER,
  }
  lines: set[int] = set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type not in skip:
      lines.update(range(tok.start[0], tok.end[0] + 1))
  return lines


def _docstring_lines(node: ast.AST) -> set[int]:
  """The lines of the docstrings of ``node`` and of every function or class inside it."""
  out: set[int] = set()
  for sub in ast.walk(node):
    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and sub.body:
      first = sub.body[0]
      if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
      ):
        out.update(range(first.lineno, first.end_lineno + 1))
  return out


def function_lengths(source: str) -> list[tuple[str, int, int]]:
  """``(name, first line, lines of code)`` of every function in ``source``; a nested function's lines
  count in its own entry and in the function around it."""
  code = _code_lines(source)
  out = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      start = min([d.lineno for d in node.decorator_list] + [node.lineno])
      lines = set(range(start, node.end_lineno + 1)) & code
      out.append((node.name, node.lineno, len(lines - _docstring_lines(node))))
  return out


def test_function_lengths_count_code_only():
  source = '''
@decorator
def f(x):
  """A docstring

  of three lines."""
  # a comment

  y = (x +
       1)
  def g():
    """Nested."""
    return y
  return g
'''
  assert dict((name, n) for name, _, n in function_lengths(source)) == {"f": 7, "g": 2}


def test_no_module_is_over_the_limit():
  over = {_name(p): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
  assert not over, f"modules over {MAX_MODULE_LINES} lines (split them by concept): {over}"


def test_no_function_is_over_the_limit():
  over = [
    f"{_name(p)}:{line} {name} ({n} lines)"
    for p in _modules()
    for name, line, n in function_lengths(p.read_text())
    if n > MAX_FUNCTION_LINES
  ]
  assert not over, (
    f"functions over {MAX_FUNCTION_LINES} lines of code (make them pipelines of phases): {over}"
  )


def _stage(module: str) -> str | None:
  """The stage of a dotted module name under ``jlora._src`` (``None`` outside it)."""
  parts = module.split(".")
  return parts[2] if parts[:2] == ["jlora", "_src"] and len(parts) > 2 else None


def _imports(path: Path) -> list[tuple[ast.AST, str, bool]]:
  """``(node, module, at_top_level)`` for every import of ``path``, relative ones resolved."""
  tree = ast.parse(path.read_text())
  package = ("jlora._src." + _name(path)[: -len(".py")].replace("/", ".")).split(".")[:-1]
  top = {id(node) for node in tree.body}
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(node, alias.name, id(node) in top) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
      out.append((node, base, id(node) in top))
  return out


def test_stages_import_only_downward():
  back, lazy = [], []
  for p in _modules():
    own = _name(p).split("/")[0]
    if own not in STAGES:
      continue
    for node, module, at_top in _imports(p):
      target = _stage(module)
      if module == "jlora" or (target is not None and target not in STAGES):
        back.append(f"{_name(p)}:{node.lineno} imports {module} (the public package or an unknown stage)")
      elif target is not None and STAGES.index(target) > STAGES.index(own):
        back.append(f"{_name(p)}:{node.lineno} ({own}) imports {module} ({target}, a later stage)")
      if (target is not None or module.startswith("jlora")) and not at_top:
        lazy.append(f"{_name(p)}:{node.lineno} imports {module} inside a function or block")
  assert not back, f"stages must import only from earlier ones, in the order {STAGES}: {back}"
  assert not lazy, f"jlora imports belong at the top of the module (no hidden back-edges): {lazy}"


def test_every_stage_is_known():
  folders = {p.name for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__"}
  assert folders == set(STAGES)


def test_every_module_has_a_test_module():
  missing = []
  for p in _modules():
    rel = p.relative_to(SRC)
    if p.name == "__init__.py" or rel.as_posix() in NO_TEST_MODULE:
      continue
    want = ROOT / "tests" / rel.parent / f"test_{p.name}"
    if not want.is_file():
      missing.append(f"{rel.as_posix()} -> {want.relative_to(ROOT).as_posix()}")
  assert not missing, f"modules without a mirrored test module: {missing}"


@pytest.mark.parametrize("module", sorted(NO_TEST_MODULE))
def test_every_exemption_names_a_module_that_exists(module):
  assert (SRC / module).is_file()


# -- tests: slow if and only if end to end --------------------------------------------------------

E2E = ROOT / "tests" / "e2e"  # its conftest.py marks every test there slow


def _is_slow_mark(node: ast.AST) -> bool:
  """``<...>.mark.slow`` or ``mark.slow`` (after ``from pytest import mark``)."""
  if not (isinstance(node, ast.Attribute) and node.attr == "slow"):
    return False
  inner = node.value
  return (isinstance(inner, ast.Attribute) and inner.attr == "mark") or (
    isinstance(inner, ast.Name) and inner.id == "mark"
  )


def _is_slow_marker_call(node: ast.AST) -> bool:
  """``item.add_marker("slow")`` or ``request.applymarker("slow")``."""
  return (
    isinstance(node, ast.Call)
    and isinstance(node.func, ast.Attribute)
    and node.func.attr in ("add_marker", "applymarker")
    and any(isinstance(a, ast.Constant) and a.value == "slow" for a in node.args)
  )


def slow_marks(source: str) -> list[int]:
  """The lines of ``source`` that mark tests slow: ``pytest.mark.slow`` in any place (a decorator, a module's
  ``pytestmark``, a parametrization's ``marks=``), and ``add_marker("slow")``/``applymarker("slow")``."""
  tree = ast.parse(source)
  return sorted({n.lineno for n in ast.walk(tree) if _is_slow_mark(n) or _is_slow_marker_call(n)})


def test_slow_marks_finds_every_form():
  source = """
import pytest
from pytest import mark
pytestmark = pytest.mark.slow
@pytest.mark.slow
def test_a(): ...
@pytest.mark.parametrize("x", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_b(x): ...
@mark.slow(reason="big")
def test_c(): ...
def pytest_collection_modifyitems(items):
  items[0].add_marker("slow")
@pytest.mark.parametrize("x", ["pytest.mark.slow"])  # pytest.mark.slow in a comment
def test_d(x): ...
"""
  assert slow_marks(source) == [4, 5, 7, 9, 12]


def test_only_end_to_end_tests_are_slow():
  marked = [
    f"{p.relative_to(ROOT).as_posix()}:{line}"
    for p in sorted((ROOT / "tests").rglob("*.py"))
    if E2E not in p.parents
    for line in slow_marks(p.read_text())
  ]
  assert not marked, (
    f"tests marked slow outside tests/e2e/: {marked}. A test is slow if and only if it lives in tests/e2e/ "
    "(whose conftest.py marks every test there slow): move the test to a topic file in tests/e2e/, without "
    "the mark. A check swept over many models keeps its cheap models in the unit module and runs its body "
    "(a `check_...` function there) on the others from tests/e2e/test_zoo_sweeps.py."
  )
