"""The package's structure: private Paddle names only in the compatibility layer, and no import cycles.

Both are read from the source with `ast`, imports inside functions included, so a lazy import
cannot hide a cycle and a private Paddle attribute cannot slip in unnoticed.
"""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "paddle_ema"
COMPAT = PACKAGE / "_compat.py"

# Private Paddle names the package needs; each must be reached only through paddle_ema._compat.
KNOWN_PADDLE_PRIVATE = {
    "_C_ops", "_run_custom_op", "_current_expected_place_", "_current_expected_place", "_pir_ops",
    "_prepend_op", "_optimized_guard", "_var_name", "_convert_to_place", "_copy_to", "_equals",
    "_BatchNormBase", "_layers", "_sub_layers", "_legacy_C_ops", "_global_flags", "_set_value",
}


# Python's own underscored names that the package uses on purpose (not Paddle's).
PYTHON_PRIVATE = {"_getframe"}


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def defined_private_names(trees):
    """Underscore names that paddle_ema itself defines (functions, classes, attributes, variables)."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return {n for n in names if n.startswith("_")}


def private_reaches(path, tree, ours):
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "paddle":
            if any(part.startswith("_") for part in node.module.split(".")):
                found.append((node.lineno, node.module))
            found.extend((node.lineno, a.name) for a in node.names if a.name.startswith("_"))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names
                         if a.name.split(".")[0] == "paddle" and any(p.startswith("_") for p in a.name.split(".")))
        elif isinstance(node, ast.Attribute):
            attr = node.attr
            if attr.startswith("_") and not attr.startswith("__") and (attr in KNOWN_PADDLE_PRIVATE or attr not in ours):
                found.append((node.lineno, attr))
    return [f"{path.relative_to(PACKAGE.parent)}:{line}: {name}" for line, name in found]


def test_private_paddle_names_only_in_the_compatibility_layer():
    trees = {p: ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in modules()}
    ours = (defined_private_names(trees.values()) | PYTHON_PRIVATE) - KNOWN_PADDLE_PRIVATE
    offences = [line for p, tree in trees.items() if p != COMPAT for line in private_reaches(p, tree, ours)]
    assert not offences, "private Paddle names outside paddle_ema/_compat.py:\n" + "\n".join(offences)


def test_the_compatibility_layer_documents_each_shim():
    tree = ast.parse(COMPAT.read_text(encoding="utf-8"))
    shims = [n for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
    assert shims
    undocumented = [n.name for n in shims if "Checked on Paddle" not in (ast.get_docstring(n) or "")]
    assert not undocumented, f"shims without 'Checked on Paddle ...' in their docstring: {undocumented}"


def imports_of(path, tree, known):
    """The paddle_ema modules `path` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            targets = [f"{root}.{a.name}" if f"{root}.{a.name}" in known else root for a in node.names]
        else:
            continue
        edges.update(t for t in targets if t in known and t != name)
    return edges


def test_no_import_cycles():
    paths = modules()
    known = {module_name(p) for p in paths}
    graph = {module_name(p): imports_of(p, ast.parse(p.read_text(encoding="utf-8")), known) for p in paths}
    # Every submodule implicitly runs the package's __init__; importing it back is not a cycle.
    graph = {m: {t for t in ts if not m.startswith(t + ".") and t != "paddle_ema"} for m, ts in graph.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles inside paddle_ema:\n" + "\n".join(cycles)


def test_every_name_a_module_exports_exists():
    # Read from the source: each name in a module's literal __all__ is defined or imported there
    # (a rename that forgets __all__ breaks `from module import *` only at a user's import).
    missing = {}
    for path in modules():
        tree = ast.parse(path.read_text())
        exported, defined = [], set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                literal = isinstance(node.value, (ast.List, ast.Tuple))
                exported = [elt.value for elt in node.value.elts] if literal else []
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            defined.add(name.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                defined.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        lazy = "__getattr__" in defined  # a module that resolves its exports lazily (paddle_ema/__init__)
        absent = [name for name in exported if name not in defined and not lazy]
        if absent:
            missing[module_name(path)] = absent
    assert not missing, missing


def documented_modules():
    """The modules whose public API carries type hints and Google-style docstrings."""
    top = [p for p in PACKAGE.glob("*.py") if not p.name.startswith("_")]
    return sorted(top + list((PACKAGE / "config").glob("*.py")) + list((PACKAGE / "kernels").glob("*.py")))


def exported_names(tree):
    """The module's literal __all__, with `__all__ += [...]` additions; None when it has none."""
    names = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            names = {elt.value for elt in node.value.elts} if isinstance(node.value, (ast.List, ast.Tuple)) else None
        elif isinstance(node, ast.AugAssign) and getattr(node.target, "id", None) == "__all__" and names is not None:
            names |= {elt.value for elt in getattr(node.value, "elts", [])}
    return names


def is_property(function):
    return any((isinstance(d, ast.Name) and d.id in ("property", "cached_property"))
               or (isinstance(d, ast.Attribute) and d.attr in ("setter", "deleter", "cached_property"))
               for d in function.decorator_list)


def signature_problems(function, where, class_doc=None, inherited_doc=False):
    """What `function` lacks: annotations (self/cls aside), a return annotation (not for __init__),
    `Args:` in its docstring when it takes arguments (a constructor's may be in the class docstring;
    an override without a docstring inherits its base's, as inspect.getdoc does), and `Returns:`
    (or `Yields:`) exactly when it returns something (annotated other than None)."""
    a = function.args
    args = a.posonlyargs + a.args + a.kwonlyargs
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in function.decorator_list)
    if class_doc is not None and not static and args:
        args = args[1:]  # self or cls
    args += [x for x in (a.vararg, a.kwarg) if x is not None]
    found = []
    bare = [x.arg for x in args if x.annotation is None]
    if bare:
        found.append(f"{where}: no type hint on {', '.join(bare)}")
    if function.returns is None and function.name != "__init__":
        found.append(f"{where}: no return type hint")
    doc = ast.get_docstring(function) or ""
    if function.name == "__init__":
        doc += "\n" + (class_doc or "")
    inherits = inherited_doc and not ast.get_docstring(function)
    if args and "Args:" not in doc and not inherits:
        found.append(f"{where}: docstring has no Args: section")
    returns_none = isinstance(function.returns, ast.Constant) and function.returns.value is None
    says_returns = "Returns:" in doc or "Yields:" in doc
    if function.returns is not None and not returns_none and not says_returns and not inherits:
        found.append(f"{where}: docstring has no Returns: section")
    if returns_none and "Returns:" in doc:
        found.append(f"{where}: returns None but its docstring has a Returns: section")
    return found


def test_public_functions_have_type_hints_and_documented_arguments():
    problems = []
    for path in documented_modules():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        names = exported_names(tree)
        where = path.relative_to(PACKAGE.parent)

        def public(name):
            return name in names if names is not None else not name.startswith("_")

        classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and public(node.name):
                problems += signature_problems(node, f"{where}:{node.lineno} {node.name}")
            elif isinstance(node, ast.ClassDef) and public(node.name):
                class_doc = ast.get_docstring(node)
                if not class_doc:
                    problems.append(f"{where}:{node.lineno} class {node.name}: no docstring")
                bases = [classes[b.id] for b in node.bases if isinstance(b, ast.Name) and b.id in classes]
                for method in node.body:
                    if not isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)) or is_property(method):
                        continue
                    if method.name.startswith("_") and method.name != "__init__":
                        continue
                    inherited = any(isinstance(m, ast.FunctionDef) and m.name == method.name and ast.get_docstring(m)
                                    for base in bases for m in base.body)
                    problems += signature_problems(method, f"{where}:{method.lineno} {node.name}.{method.name}",
                                                   class_doc or "", inherited)
    assert not problems, "public functions without type hints or Args:/Returns: sections:\n" + "\n".join(problems)


# Modules that moved into core/, infra/ and dropin/, or were renamed in engine/, by their old paths.
MOVED = {
    "paddle_ema.schedules": "paddle_ema.core.schedules",
    "paddle_ema.step_policy": "paddle_ema.core.step_policy",
    "paddle_ema.averaging": "paddle_ema.core.averaging",
    "paddle_ema.selection": "paddle_ema.core.selection",
    "paddle_ema.checkpoint": "paddle_ema.infra.checkpoint",
    "paddle_ema.restricted_pickle": "paddle_ema.infra.restricted_pickle",
    "paddle_ema.sharding": "paddle_ema.infra.sharding",
    "paddle_ema.program_ops": "paddle_ema.infra.program_ops",
    "paddle_ema.ppdet": "paddle_ema.dropin.ppdet",
    "paddle_ema.engine.averages": "paddle_ema.engine.average_protocol",
    "paddle_ema.engine.average_files": "paddle_ema.engine.checkpoint_averaging",
    "paddle_ema.engine.extra_averages": "paddle_ema.engine.swa_posthoc_setup",
    "paddle_ema.engine.runs": "paddle_ema.engine.trainer_choice",
    "paddle_ema.engine.run_folder": "paddle_ema.engine.output_folder",
    "paddle_ema.engine.run_checkpoints": "paddle_ema.engine.checkpoint_files",
}


def test_old_import_paths_resolve_to_the_new_modules():
    # In a fresh process whose first import is an old path, as a user's script would do it.
    code = textwrap.dedent(
        f"""
        import importlib, sys
        import paddle_ema.engine.run_checkpoints as first
        from paddle_ema.ppdet import ModelEMA, SimpleModelEMA
        from paddle_ema.schedules import make_schedule
        moved = {MOVED!r}
        assert first is sys.modules["paddle_ema.engine.checkpoint_files"]
        for old, new in moved.items():
            module = importlib.import_module(old)
            assert module is importlib.import_module(new), old
            assert sys.modules[old] is sys.modules[new] and module.__name__ == new, old
            package, _, name = old.rpartition(".")
            assert getattr(sys.modules[package], name) is module, old
        import paddle_ema.step_policy
        assert paddle_ema.step_policy.StepPolicy is sys.modules["paddle_ema.core.step_policy"].StepPolicy
        assert ModelEMA.__module__ == "paddle_ema.dropin.ppdet" and SimpleModelEMA is paddle_ema.SimpleModelEMA
        assert make_schedule is sys.modules["paddle_ema.core.schedules"].make_schedule
        print("ok", len(moved))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["ok", str(len(MOVED))]


def test_the_new_packages_are_found_by_setup():
    from setuptools import find_packages

    found = find_packages(str(PACKAGE.parent), include=["paddle_ema", "paddle_ema.*"])
    assert {"paddle_ema.core", "paddle_ema.kernels", "paddle_ema.infra", "paddle_ema.dropin",
            "paddle_ema.integrations", "paddle_ema.config", "paddle_ema.engine"} <= set(found), found
