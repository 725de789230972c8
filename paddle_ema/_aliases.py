"""Old import paths of moved modules: `paddle_ema.schedules` is `paddle_ema.core.schedules`.

`register(package, old=module, ...)` puts each module into `sys.modules` under its old dotted name
and binds it as the package's attribute of that name. Python's import system looks a name up in `sys.modules` again after importing its parent package,
so `import paddle_ema.schedules`, `from paddle_ema.schedules import X` and
`importlib.import_module("paddle_ema.schedules")` all give the one module object of the new path:
a function patched through either name is the one the module's callers run, and module state
(a schedule registry) is not copied.
"""

import sys
from types import ModuleType

__all__ = ["register"]


def register(package: str, **modules: ModuleType) -> None:
    """Make each module importable as `<package>.<old name>` too, and an attribute of the package.

    Args:
        package: the dotted name of the package the old names lived in.
        **modules: old name -> the module object now at its new path.
    """
    parent = sys.modules[package]
    for old, module in modules.items():
        sys.modules.setdefault(f"{package}.{old}", module)
        setattr(parent, old, module)
