"""Reading a config file, in either style, into plain nested dicts.

InternEvo style: module-level ``model = dict(...)``, ``data = dict(...)``, upper-case helper variables such as
``SEQ_LEN``, base files imported ``with read_base():`` from ``configs._base_``. ml_collections style: a
``get_config()`` returning a dict/ConfigDict. ``--config=NAME`` may also name a config shipped with the package.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import runpy
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections

from internevo_jax.config.errors import ConfigError, warn


@contextlib.contextmanager
def read_base() -> Iterator[None]:
    """InternEvo's (mmengine's) marker around the imports of base config files::

        from internlm.utils.utils import read_base  # or: from internevo_jax.config import read_base

        with read_base():
            from configs._base_.models.internlm2_7B import *

    It does nothing itself: the imports inside are ordinary imports. While ``read_config_file`` executes a config
    file, ``internlm.utils.utils.read_base`` is this function (InternEvo need not be installed) and the package
    ``configs`` is the config file's own tree (``_config_imports``).
    """
    yield


# Module names a config file's imports see only while it executes: InternEvo's read_base, and its own configs tree.
_SHIM_MODULES = ("internlm", "internlm.utils", "internlm.utils.utils")
_BASE_PACKAGE = "configs"
_IMPORT_LOCK = threading.RLock()  # the swap of sys.modules entries below is process-wide


def _owned(name: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in ("internlm", _BASE_PACKAGE))


def base_roots(path: str | Path) -> list[Path]:
    """Where ``configs._base_...`` imports of the config file ``path`` resolve: the folder holding the ``configs``
    folder the file lives in (InternEvo's layout: ``<repo>/configs/demo.py`` imports ``configs._base_``), then the
    file's own folder (a file beside a ``configs/_base_`` tree)."""
    path = Path(path).absolute()
    roots = [parent.parent for parent in path.parents if parent.name == _BASE_PACKAGE][:1] + [path.parent]
    return list(dict.fromkeys(roots))


class _ConfigsFinder:
    """A ``sys.meta_path`` finder for the top-level package ``configs`` only, found under the given roots; its
    submodules (``configs._base_.models.x``) are then found through the package's ``__path__`` as usual."""

    def __init__(self, roots: list[Path]):
        self.dirs = [str(r / _BASE_PACKAGE) for r in roots if (r / _BASE_PACKAGE).is_dir()]

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != _BASE_PACKAGE or not self.dirs:
            return None
        init = Path(self.dirs[0]) / "__init__.py"
        if init.is_file():
            return importlib.util.spec_from_file_location(name, init, submodule_search_locations=self.dirs)
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)  # a namespace package over self.dirs
        spec.submodule_search_locations = list(self.dirs)
        return spec

    def invalidate_caches(self) -> None:
        pass


@contextlib.contextmanager
def _config_imports(path: Path) -> Iterator[None]:
    """While a config file executes: ``internlm.utils.utils.read_base`` is ``read_base`` and ``configs`` is the file's
    own tree (``base_roots``). Afterwards ``sys.modules``, ``sys.meta_path`` and the path-importer cache are as
    before: no fake ``internlm`` stays behind, a real one (or another ``configs`` package) imported earlier is put
    back, and the next load imports the base files afresh (an edit between two loads is seen). Base files import
    without writing ``__pycache__`` folders into the user's config tree."""
    with _IMPORT_LOCK:
        saved = {name: sys.modules.pop(name) for name in [n for n in sys.modules if _owned(n)]}
        cached = set(sys.path_importer_cache)
        finder = _ConfigsFinder(base_roots(path))
        shims = {name: types.ModuleType(name) for name in _SHIM_MODULES}
        for name, module in shims.items():
            if name != "internlm.utils.utils":
                module.__path__ = []  # a package: "import internlm.utils.utils" finds the child in sys.modules
            sys.modules[name] = module
        # Through vars(): a bare ModuleType declares no attributes, so a type checker rejects `module.name = ...`.
        vars(shims["internlm.utils.utils"])["read_base"] = read_base
        vars(shims["internlm"])["utils"] = shims["internlm.utils"]
        vars(shims["internlm.utils"])["utils"] = shims["internlm.utils.utils"]
        dont_write = sys.dont_write_bytecode
        sys.dont_write_bytecode = True
        sys.meta_path.insert(0, finder)
        importlib.invalidate_caches()  # files written a moment ago (same directory mtime) are seen
        try:
            yield
        finally:
            sys.meta_path.remove(finder)
            sys.dont_write_bytecode = dont_write
            for name in [n for n in sys.modules if _owned(n)]:
                del sys.modules[name]
            sys.modules.update(saved)
            for key in set(sys.path_importer_cache) - cached:
                del sys.path_importer_cache[key]


def shipped_configs() -> Path | None:
    """The folder of the configs that come with the package: ``internevo_jax/configs`` when installed (a wheel ships
    the checkout's ``configs/`` there), else the checkout's ``configs/`` beside the package; None if neither."""
    # find_spec, not importlib.resources: runpy executes a config as a file, so a real folder is needed.
    spec = importlib.util.find_spec("internevo_jax.configs")
    folders = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    folders.append(Path(__file__).resolve().parents[2] / _BASE_PACKAGE)
    return next((f for f in folders if f.is_dir()), None)


def shipped_config_names() -> list[str]:
    """What ``--config=NAME`` accepts: the shipped configs' file names without ``.py`` (not the ``_base_`` parts)."""
    folder = shipped_configs()
    names = folder.glob("*.py") if folder else []
    return sorted(p.stem for p in names if not p.name.startswith(("_", ".")))


def resolve_config_path(path: str | Path) -> Path:
    """The config file ``--config`` means: a path to a file as given (it always wins); else a bare name such as
    ``demo`` or ``internlm2_1_8b.py`` (no folder part) is the shipped config of that name (``shipped_configs``)."""
    given = Path(path)
    if given.is_file():
        return given
    name = str(path)
    folder = shipped_configs()
    if folder is not None and given.name == name and name.removesuffix(".py") in shipped_config_names():
        return folder / f"{name.removesuffix('.py')}.py"
    names = ", ".join(shipped_config_names()) or "none found"
    raise ConfigError(
        f"config file {path} does not exist (pass --config=path/to/config.py, or the name of a shipped config: {names})"
    )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Executes a config file and returns its values as plain nested dicts.

    InternEvo style: every module-level name not starting with ``_`` that is not a module, class or function,
    including those a ``with read_base(): from configs._base_.models.x import *`` brought in (later assignments in
    the file win, as in Python). ml_collections style: the result of ``get_config()``.
    """
    path = resolve_config_path(path)
    try:
        with _config_imports(path):
            namespace = runpy.run_path(str(path))
    except ModuleNotFoundError as e:
        if e.name and _owned(e.name):
            where = " or ".join(str(r / _BASE_PACKAGE) for r in base_roots(path))
            raise ConfigError(
                f"config file {path} failed to execute: {type(e).__name__}: {e}; `{_BASE_PACKAGE}.` imports are "
                f"looked up in {where} (the folder holding the `{_BASE_PACKAGE}` folder the file lives in, or the "
                f"file's own folder), and of InternEvo's `internlm` package only `internlm.utils.utils.read_base` "
                "is provided"
            ) from e
        raise ConfigError(f"config file {path} failed to execute: {type(e).__name__}: {e}") from e
    except Exception as e:  # a broken config file is a user error: show where, not a traceback wall
        raise ConfigError(f"config file {path} failed to execute: {type(e).__name__}: {e}") from e
    if "_base_" in namespace:
        warn(
            f"{path}: `_base_ = {namespace['_base_']!r}` (an mmengine-style inheritance list) is ignored; import "
            "the base files instead: `with read_base(): from configs._base_.models.<name> import *` (read_base "
            "from internlm.utils.utils or internevo_jax.config)"
        )
    if callable(namespace.get("get_config")):
        values = _plain(namespace["get_config"]())  # a ConfigDict becomes a plain dict here
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: get_config() must return a dict or ConfigDict, got {type(values).__name__}")
        return values
    values = {}
    for name, value in namespace.items():
        if name.startswith("_") or callable(value) or type(value).__name__ == "module":
            continue
        values[name] = value
    return _plain(values)


def _plain(value: Any) -> Any:
    """Deep-copies dicts/ConfigDicts into plain dicts (InternEvo configs may nest Config objects)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
