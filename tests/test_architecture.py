"""The package's structure: private names of other libraries only in the compatibility layer, no
import from a lower layer to a higher one, and no import cycles.

All are read from the source with `ast`, imports inside functions included, so a lazy import
cannot hide a cycle or an upward import and a private attribute cannot slip in unnoticed.
"""

import ast
import os
import re
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


# Python's own underscored names that the package uses on purpose outside _compat (none: CPython's
# private reaches are shims there too).
PYTHON_PRIVATE = set()
# Other libraries' namespaces that are private as a whole, underscored or not.
PRIVATE_NAMESPACES = ("paddle.base", "paddle.fluid", "paddle.framework.core", "paddle.jit.dy2static")
# Not underscored, but in no __all__ and documented nowhere: reached only through _compat.
UNDOCUMENTED = {
    "os.environ.encodekey", "os.environ.decodevalue",
    "paddle.utils.cpp_extension.load_op_meta_info_and_register_op",
    "paddle.framework.in_pir_mode",
}


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


def external_aliases(tree):
    """Local name -> dotted path, for the names a module binds to other libraries' modules or attributes."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] != "paddle_ema":
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] != "paddle_ema":
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def dotted(node, aliases):
    """The dotted path of an attribute chain (getattr with a constant name included) rooted at an
    external alias, or None."""
    parts = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str):
            parts.append(node.args[1].value)
            node = node.args[0]
        elif isinstance(node, ast.Name) and node.id in aliases:
            return ".".join([aliases[node.id]] + parts[::-1])
        else:
            return None


def is_private_path(path):
    parts = path.split(".")
    underscored = any(p.startswith("_") and not p.startswith("__") for p in parts[1:])
    return underscored or path.startswith(PRIVATE_NAMESPACES) or path in UNDOCUMENTED


def foreign_private_reaches(path, tree, ours):
    """Reaches today's attribute rule misses: chains into another library's private namespaces or
    through an underscored component (os.environ._data, sys._getframe), undocumented names,
    getattr/hasattr/setattr/delattr with an underscored constant paddle_ema does not define, and
    `from X import Y` of any of these."""
    aliases = external_aliases(tree)
    found = set()
    for node in ast.walk(tree):
        chain = dotted(node, aliases) if isinstance(node, (ast.Attribute, ast.Call)) else None
        if chain and is_private_path(chain):
            found.add((node.lineno, chain))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            attr = node.args[1].value
            if attr.startswith("_") and not attr.startswith("__") and attr not in ours:
                found.add((node.lineno, f"{node.func.id}(..., {attr!r})"))
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] != "paddle_ema":
            found.update((node.lineno, f"from {node.module} import {a.name}") for a in node.names
                         if is_private_path(f"{node.module}.{a.name}"))
    # One line per reach: a chain that starts a longer one on the same line is the same reach.
    kept = {(line, what) for line, what in found
            if not any(l2 == line and w2 != what and w2.startswith(what + ".") for l2, w2 in found)}
    return sorted(f"{path.relative_to(PACKAGE.parent)}:{line}: {what}" for line, what in kept)


def test_private_names_of_other_libraries_only_in_the_compatibility_layer():
    trees = {p: ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in modules()}
    ours = defined_private_names(trees.values()) - KNOWN_PADDLE_PRIVATE
    offences = [line for p, tree in trees.items() if p != COMPAT for line in foreign_private_reaches(p, tree, ours)]
    assert not offences, "private or undocumented names of other libraries outside paddle_ema/_compat.py:\n" + \
        "\n".join(offences)


def test_the_private_reach_rules_catch_each_kind():
    # The rules above, on a module that commits each offence once, and on the same module's allowed twins.
    source = textwrap.dedent(
        """
        import os, sys
        import paddle
        from paddle.base import framework
        from paddle.utils.cpp_extension import load_op_meta_info_and_register_op
        a = os.environ._data
        b = sys._getframe(1)
        c = paddle.base.framework.convert_np_dtype_to_dtype_
        d = getattr(model, "_optimizer", None)
        e = hasattr(model, "_layers")
        f = paddle.framework.in_pir_mode()
        g = os.environ.get("X")
        h = getattr(self, "_ours", None)
        """
    )
    found = foreign_private_reaches(PACKAGE / "example.py", ast.parse(source), {"_ours"})
    assert sorted(line.split(": ", 1)[1] for line in found) == sorted([
        "from paddle.base import framework",
        "from paddle.utils.cpp_extension import load_op_meta_info_and_register_op",
        "os.environ._data", "sys._getframe", "paddle.base.framework.convert_np_dtype_to_dtype_",
        "getattr(..., '_optimizer')", "hasattr(..., '_layers')", "paddle.framework.in_pir_mode",
    ])


def test_paddles_protected_tensor_members_only_in_the_cpp_compatibility_header():
    # DenseTensor's holder_ and meta_ are protected members: ema_compat.h alone names them.
    csrc = PACKAGE / "kernels" / "csrc"
    offences = []
    for path in sorted(csrc.iterdir()):
        if path.suffix not in (".cc", ".h", ".cu", ".cuh") or path.name == "ema_compat.h":
            continue
        text = path.read_text(encoding="utf-8")
        code = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)
        offences += [f"{path.name}: {m}" for m in sorted(set(re.findall(r"\b(?:holder_|meta_)\b", code)))]
    assert not offences, offences


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


# The layers, lowest first: a module imports modules of its own layer and lower ones only.
# "pkg.*" is the package and everything under it; every module of paddle_ema is in exactly one.
LAYER_RANKS = [
    ("foundation", ["paddle_ema._compat", "paddle_ema._require", "paddle_ema._aliases", "paddle_ema.errors",
                    "paddle_ema.environment"]),
    ("math core", ["paddle_ema.core.*"]),
    ("kernels", ["paddle_ema.kernels.*"]),
    ("infrastructure", ["paddle_ema.infra.*"]),
    ("front-ends", ["paddle_ema.dygraph", "paddle_ema.static", "paddle_ema.posthoc", "paddle_ema.batchnorm",
                    "paddle_ema.callbacks", "paddle_ema.dropin.*", "paddle_ema.integrations.*"]),
    ("config", ["paddle_ema.config.*"]),
    ("engine", ["paddle_ema.engine.*"]),
    ("package", ["paddle_ema"]),
]


def layer_of(module):
    """(rank, layer name) of a module, or None when no layer names it."""
    found = []
    for rank, (layer, patterns) in enumerate(LAYER_RANKS):
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".*") and
                                     (module == pattern[:-2] or module.startswith(pattern[:-1]))):
                found.append((rank, layer))
    return found[0] if len(found) == 1 else None


def upward_imports(path, tree, known):
    """The imports of `path` that reach a higher layer than its own."""
    name = module_name(path)
    rank, layer = layer_of(name)
    upward = []
    for target in sorted(imports_of(path, tree, known)):
        if name.startswith(target + "."):
            continue  # a submodule runs its package's __init__ anyway
        target_rank, target_layer = layer_of(target)
        if target_rank > rank:
            upward.append(f"{name} ({layer}) imports {target} ({target_layer})")
    return upward


def test_no_import_from_a_lower_layer_to_a_higher_one():
    paths = modules()
    known = {module_name(p) for p in paths}
    unplaced = sorted(m for m in known if layer_of(m) is None)
    assert not unplaced, f"modules in no layer (or in several) of LAYER_RANKS: {unplaced}"
    upward = [line for p in paths for line in upward_imports(p, ast.parse(p.read_text(encoding="utf-8")), known)]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)
    # The rule itself: a lazy import from the math core into the kernels is caught.
    planted = ast.parse("def f():\n    from ..kernels import fused\n")
    assert upward_imports(PACKAGE / "core" / "averaging.py", planted, known) == [
        "paddle_ema.core.averaging (math core) imports paddle_ema.kernels.fused (kernels)"]


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
    """The modules whose public API carries type hints and Google-style docstrings: all but the
    engine behind the tools and the underscored foundation."""
    top = [p for p in PACKAGE.glob("*.py") if not p.name.startswith("_")]
    folders = ("core", "kernels", "infra", "dropin", "integrations", "config")
    return sorted(top + [p for folder in folders for p in (PACKAGE / folder).rglob("*.py")])


def exported_names(tree):
    """The module's literal __all__; None when it has none."""
    names = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            names = {elt.value for elt in node.value.elts} if isinstance(node.value, (ast.List, ast.Tuple)) else None
    return names


def test_no_module_extends_its_all_after_the_literal():
    extended = [module_name(p) for p in modules() for node in ast.parse(p.read_text(encoding="utf-8")).body
                if isinstance(node, ast.AugAssign) and getattr(node.target, "id", None) == "__all__"]
    assert not extended, extended


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
