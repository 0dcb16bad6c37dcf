"""The repository's import graph: no cycle between modules, and imports flow one way.

Ranks (README "Architecture"): a module imports modules of its own package or of a package of
lower rank only, so the packages of one rank (training, sampling, evaluation) never import each
other. The ranked packages are perceivers_jax's subpackages and, beside it, data_prep and the
benchmark scripts (launch/ holds no Python). Every import counts: module-level, function-level
and conditional ones, read with `ast` (nothing is imported); a script folder (no __init__.py,
run as `python folder/x.py`) also imports its siblings by bare name.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "perceivers_jax"
TOP_LEVEL = (PACKAGE, "data_prep", "benchmarks")
RANKS = {
    "config_base": 0,
    "data": 1, "parallel": 1, "runtime": 1, "configs": 1,
    "model": 2, "data_prep": 2,
    "state": 3,
    "training": 4, "sampling": 4, "evaluation": 4,
    "watch": 5,
    "experiments": 6,
    "cli": 7,
    "benchmarks": 8,
}


def modules_of(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
  """{dotted module name: file} of every module under root/package (packages as __init__)."""
  modules = {}
  for path in sorted((root / package).rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  return modules


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
  """The dotted name of everything imported anywhere in `tree` (`from a.b import c`: a.b.c)."""
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolved against this module's package.
        base = module.split(".")
        base = base[:len(base) - node.level + (1 if is_package else 0)]
        prefix = ".".join(base + ([node.module] if node.module else []))
      else:
        prefix = node.module
      names += [f"{prefix}.{alias.name}" for alias in node.names]
  return names


def import_graph(root: pathlib.Path, top_level: tuple[str, ...]) -> dict[str, set[str]]:
  """{module: the modules under root/top_level it imports}: `from a.b import c` names module
  a.b.c when that is a module, else a.b (a package's own __init__ counts as a module)."""
  modules = {}
  for folder in top_level:
    modules |= modules_of(root, folder)
  graph = {}
  for module, path in modules.items():
    targets = set()
    names = _imported_names(ast.parse(path.read_text(), str(path)), module,
                            path.name == "__init__.py")
    if not (path.parent / "__init__.py").exists():  # a script: its folder is on sys.path
      folder = module.rpartition(".")[0]
      names += [f"{folder}.{name}" for name in names]
    for name in names:
      # The longest module the name starts with: `a.b.f` (a function f of module a.b) -> a.b.
      parts = name.split(".")
      for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
          if candidate not in top_level:  # an empty top-level __init__ is no dependency.
            targets.add(candidate)
          break
    targets.discard(module)
    graph[module] = targets
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), each sorted."""
  index, low, on_stack, stack, found = {}, {}, set(), [], []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for target in sorted(graph.get(node, ())):
      if target not in index:
        visit(target)
        low[node] = min(low[node], low[target])
      elif target in on_stack:
        low[node] = min(low[node], index[target])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return found


def layer_of(module: str, package: str = PACKAGE) -> str:
  """The ranked package of a dotted module name: a subpackage (or top-level module) of
  `package`, else the top-level folder itself (data_prep, benchmarks)."""
  parts = module.split(".")
  return parts[1] if parts[0] == package and len(parts) > 1 else parts[0]


def upward_imports(graph: dict[str, set[str]], ranks: dict[str, int],
                   package: str = PACKAGE) -> list[str]:
  """"importer -> imported" for each import into another package of the same or a higher rank."""
  bad = []
  for module, targets in sorted(graph.items()):
    for target in sorted(targets):
      source, dest = layer_of(module, package), layer_of(target, package)
      if source != dest and ranks[dest] >= ranks[source]:
        bad.append(f"{module} (rank {ranks[source]}) -> {target} (rank {ranks[dest]})")
  return bad


@pytest.fixture(scope="module")
def graph():
  return import_graph(ROOT, TOP_LEVEL)


def test_every_package_has_a_rank(graph):
  assert {layer_of(m) for m in graph} >= {"configs", "data_prep", "benchmarks"}
  unranked = sorted({layer_of(m) for m in graph if m != PACKAGE} - set(RANKS))
  assert not unranked, f"give {unranked} a rank in RANKS (and a line in README's Architecture)"


def test_no_import_cycle(graph):
  assert not cycles(graph), f"import cycles between modules: {cycles(graph)}"


def test_imports_flow_from_higher_packages_to_lower(graph):
  bad = upward_imports(graph, RANKS)
  assert not bad, "imports into a package of the same or higher rank:\n" + "\n".join(bad)


def test_the_walk_sees_what_a_planted_import_adds(tmp_path):
  """A miniature package, a second top-level package and a script folder: a function-level
  import closing a cycle, a relative import, upward imports and a script's bare import of its
  sibling are all found (so the checks above can fail)."""
  pkg = tmp_path / "pkg"
  for folder in ("low", "high"):
    (pkg / folder).mkdir(parents=True)
    (pkg / folder / "__init__.py").write_text("")
  (pkg / "__init__.py").write_text("")
  (pkg / "low" / "a.py").write_text("from pkg.low import b\n")
  (pkg / "low" / "b.py").write_text("def f():\n  from . import a\n  return a\n")
  (pkg / "low" / "c.py").write_text("import pkg.high.d\n")
  (pkg / "high" / "d.py").write_text("from pkg.low.a import name\n")
  (tmp_path / "prep").mkdir()
  (tmp_path / "prep" / "__init__.py").write_text("from pkg.high import d\n")
  (tmp_path / "scripts").mkdir()
  (tmp_path / "prep" / "y.py").write_text("")
  (tmp_path / "scripts" / "run.py").write_text("import helper\nfrom prep import y\n")
  (tmp_path / "scripts" / "helper.py").write_text("")
  planted = import_graph(tmp_path, ("pkg", "prep", "scripts"))
  assert planted["pkg.low.a"] == {"pkg.low.b"} and planted["pkg.low.b"] == {"pkg.low.a"}
  assert planted["pkg.high.d"] == {"pkg.low.a"}
  assert planted["scripts.run"] == {"scripts.helper", "prep.y"}
  assert cycles(planted) == [["pkg.low.a", "pkg.low.b"]]
  assert upward_imports(planted, {"low": 0, "high": 1, "prep": 1, "scripts": 2}, "pkg") == [
      "pkg.low.c (rank 0) -> pkg.high.d (rank 1)", "prep (rank 1) -> pkg.high.d (rank 1)"]
