"""Optimizer class paths (``"torch.optim.RAdam"``): which modules lightning-optim may import by name.

A class path can come from a file — a YAML config, or a checkpoint's ``hyper_parameters.optim.name`` read back
by ``LanguageModel.load_from_checkpoint`` — and importing a module runs its code. So a path is imported only
if its module lies under an allowed package; anything else is refused with a ``ValueError`` *before* any
import, naming the path and how to allow it.

Allowed by default (:data:`DEFAULT_ALLOWED_MODULES`): lightning-optim's own modules, ``torch`` (``torch.optim``
among them) and well-known optimizer packages — ``pytorch_optimizer``, ``heavyball``, ``torchao``,
``bitsandbytes``, ``schedulefree``, ``prodigyopt``, ``lion_pytorch``, ``timm``, ``transformers``, ``apex``.
Add more with :func:`allow_optimizer_module` (``lightning_optim.allow_optimizer_module("mypkg")``) or the
environment variable ``LIGHTNING_OPTIM_ALLOWED_MODULES`` (comma-separated, read at each lookup). An entry
allows the module itself and everything below it: ``"mypkg"`` allows ``mypkg.optim.MyAdam``.
"""

from __future__ import annotations

import importlib
import os

__all__ = [
    "DEFAULT_ALLOWED_MODULES",
    "ALLOWED_MODULES_ENV",
    "allow_optimizer_module",
    "allowed_optimizer_modules",
    "check_class_path",
    "import_optimizer_class",
    "import_object",
]

DEFAULT_ALLOWED_MODULES: tuple[str, ...] = (
    "lightning_optim",
    "torch",
    "pytorch_optimizer",
    "heavyball",
    "torchao",
    "bitsandbytes",
    "schedulefree",
    "prodigyopt",
    "lion_pytorch",
    "timm",
    "transformers",
    "apex",
)
ALLOWED_MODULES_ENV = "LIGHTNING_OPTIM_ALLOWED_MODULES"

_user_allowed: list[str] = []


def _is_dotted_name(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def allow_optimizer_module(module: str) -> None:
    """Allow optimizer class paths under ``module`` (a package or module name such as ``"mypkg"``)."""
    if not isinstance(module, str) or not _is_dotted_name(module.strip()):
        raise ValueError(f"allow_optimizer_module: {module!r} is not a module name such as 'mypkg' or 'mypkg.optim'")
    module = module.strip()
    if module not in _user_allowed:
        _user_allowed.append(module)


def _env_allowed() -> list[str]:
    raw = os.environ.get(ALLOWED_MODULES_ENV, "")
    entries = [e.strip() for e in raw.split(",") if e.strip()]
    for e in entries:
        if not _is_dotted_name(e):
            raise ValueError(f"{ALLOWED_MODULES_ENV} entry {e!r} is not a module name (expected e.g. 'mypkg,other.optim')")
    return entries


def allowed_optimizer_modules() -> tuple[str, ...]:
    """The modules class paths may come from now: the defaults, then the user's, then the environment's."""
    return DEFAULT_ALLOWED_MODULES + tuple(_user_allowed) + tuple(_env_allowed())


def check_class_path(path: str) -> tuple[str, str]:
    """``(module, attribute)`` of ``path`` if its module is allowed; ``ValueError`` otherwise. Imports nothing."""
    path = path.strip()
    module, _, attr = path.rpartition(".")
    if not module or not _is_dotted_name(path):
        raise ValueError(f"optimizer class path {path!r} is not of the form 'package.module.ClassName'")
    allowed = allowed_optimizer_modules()
    if not any(module == a or module.startswith(a + ".") for a in allowed):
        top = module.split(".")[0]
        raise ValueError(
            f"optimizer class path {path!r} names module {module!r}, which lightning-optim does not import by name "
            f"(allowed: {', '.join(allowed)}); nothing was imported. If you trust it, allow it with "
            f"lightning_optim.allow_optimizer_module({top!r}) or {ALLOWED_MODULES_ENV}={top}"
        )
    return module, attr


def import_optimizer_class(path: str) -> object:
    """The object ``path`` names, after :func:`check_class_path`; ``ValueError`` if it cannot be imported."""
    module_name, attr = check_class_path(path)
    return _import(module_name, attr, f"optimizer class path {path.strip()!r}")


def import_object(path: str) -> object:
    """The object a trusted path names, ``"package.module:Name"`` or ``"package.module.Name"`` (the one
    import-by-path helper; the spec's ``callbacks`` use the ``:`` form). No allow-list: for paths written in
    code (registered specs), not read from files — those go through :func:`import_optimizer_class`."""
    text = path.strip() if isinstance(path, str) else ""
    module_name, sep, attr = text.partition(":")
    if not sep:
        module_name, _, attr = text.rpartition(".")
    if not (_is_dotted_name(module_name) and attr.isidentifier()):
        raise ValueError(f"{path!r} is not an import path such as 'package.module:Name' or 'package.module.Name'")
    return _import(module_name, attr, f"import path {text!r}")


def _import(module_name: str, attr: str, what: str) -> object:
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what} could not be imported: {err}") from err
    if not hasattr(module, attr):
        raise ValueError(f"{what} could not be imported: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)
