"""``sparse_deploy.prune`` and ``sparse_deploy.export`` name both a subpackage and a public function of the
package (``from sparse_deploy import prune``). Once a subpackage is imported, Python binds its name on
``sparse_deploy`` to the module, so the subpackage itself must be callable as the function."""

from __future__ import annotations

import importlib
import sys
import types


def make_callable(package: str, target: str) -> None:
    """Calling the module ``package`` calls ``target`` ("module:function"), imported on the first call."""
    module_name, _, function = target.partition(":")

    class CallablePackage(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(importlib.import_module(module_name), function)(*args, **kwargs)

    sys.modules[package].__class__ = CallablePackage
