"""Guard: the package's modules import each other without a circle (imports inside functions included), so a lower
module never reaches up into a higher one."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1]/'agent_distillation'

def intra_imports(path: Path, pkg: str = 'agent_distillation') -> set:
    "Modules of `pkg` that a file imports anywhere in it (top level, functions, methods)."
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level == 1: base = mod
            elif node.level == 0 and (mod == pkg or mod.startswith(pkg + '.')): base = mod[len(pkg) + 1:]
            else: continue
            if base: found.add(base.split('.')[0])
            else: found |= {a.name for a in node.names}          # from . import x
        elif isinstance(node, ast.Import):
            found |= {a.name.split('.')[1] for a in node.names if a.name.startswith(pkg + '.')}
    return found - {path.stem}

def import_graph(pkg_dir: Path = PKG) -> dict:
    "Module -> the package's modules it imports."
    mods = {p.stem for p in pkg_dir.glob('*.py')}
    return {p.stem: intra_imports(p) & mods for p in sorted(pkg_dir.glob('*.py'))}

def find_cycle(graph: dict) -> list | None:
    "One import circle as a list of modules (first repeated at the end), or None."
    state, stack = {}, []
    def visit(m):
        state[m] = 'open'; stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 'open': return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)): return c
        state[m] = 'done'; stack.pop()
        return None
    for m in sorted(graph):
        if m not in state and (c := visit(m)): return c
    return None

def test_cycle_finder_finds_circles_and_lazy_imports(tmp_path):
    (tmp_path/'a.py').write_text('from .b import x\n')
    (tmp_path/'b.py').write_text('def f():\n    from agent_distillation.c import y\n')      # lazy, inside a function
    (tmp_path/'c.py').write_text('import agent_distillation.a\n')
    (tmp_path/'d.py').write_text('from . import a\nimport json\n')
    g = import_graph(tmp_path)
    assert g == {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
    assert find_cycle(g) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set(), 'd': {'a', 'b'}}) is None

def test_package_has_no_import_circle():
    g = import_graph()
    assert {'agent', 'voting', 'rollouts', 'evaluate'} <= set(g)
    assert 'voting' not in g['agent'] and 'agent' in g['voting']      # SAG is a policy handed to the agent
    assert find_cycle(g) is None, f"import circle: {' -> '.join(find_cycle(g))}"
