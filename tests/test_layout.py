"""The shape of the code, as issue #20 set it: no import cycle among the project's modules (imports
inside functions count), no `global` statements, and train.py small enough to read in one sitting."""
import ast
import os

from conftest import ROOT

MODULES = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}


def imports_of(module):
    """The project modules that `module` imports anywhere in its file (top level or inside a
    function)."""
    tree = ast.parse(open(os.path.join(ROOT, f"{module}.py"), encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            found |= {arg.value for arg in node.args if isinstance(arg, ast.Constant)}
    return found & MODULES - {module}


def find_cycle(graph):
    """One cycle of the directed graph {node: {successors}} as a list of nodes, or None."""
    state = {}  # node -> "open" while on the DFS path, "done" after

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_the_project_modules():
    graph = {module: imports_of(module) for module in MODULES}
    assert {"train", "config", "checkpoint", "distributed", "toy", "files"} <= MODULES
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert imports_of("files") == set(), "files.py is the leaf every module may import"


def test_no_global_statements():
    for module in sorted(MODULES):
        tree = ast.parse(open(os.path.join(ROOT, f"{module}.py"), encoding="utf-8").read())
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Global, ast.Nonlocal))], module


def test_model_py_reads_in_one_sitting():  # every family included
    assert len(open(os.path.join(ROOT, "model.py"), encoding="utf-8").read().splitlines()) <= 550


def test_train_py_reads_in_one_sitting():
    source = open(os.path.join(ROOT, "train.py"), encoding="utf-8").read()
    assert len(source.splitlines()) <= 350
    functions = [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    longest = max(functions, key=lambda n: n.end_lineno - n.lineno)
    assert longest.end_lineno - longest.lineno + 1 <= 60, longest.name
    # the step comes first, then the loop, then main
    names = [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)]
    assert names.index("loss_step") < names.index("train_step") < names.index("train") < names.index("main")
