"""Variants from outside the project: plugin files or modules, and installed packages' entry points.

A plugin is a Python file or an importable module whose ``@register`` classes add FFN variants. They are
named by ``sffn train --plugin FILE_OR_MODULE`` (repeatable), the config key ``plugins`` (comma-separated;
saved with the run, so ``eval``, ``sample``, ``--resume``, ``ablate`` and ``report`` load them again), and
the environment variable ``SFFN_PLUGINS`` (separated by ``os.pathsep``). An installed package declares its
variants' module under the entry-point group ``sffn_lab.variants``; those load with this package.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

from sffn_lab.errors import UserError

ENTRY_POINT_GROUP = "sffn_lab.variants"
ENV_VARIABLE = "SFFN_PLUGINS"


def split(spec: str) -> list[str]:
    """The plugins named in a ``plugins`` value: "a.py,pkg.mod" → ["a.py", "pkg.mod"]."""
    return [part.strip() for part in spec.split(",") if part.strip()]


def canonical(plugin: str) -> str:
    """A file as its absolute path (the run is evaluated from anywhere), a module name as it is."""
    return str(Path(plugin).expanduser().resolve()) if _is_file(plugin) else plugin


def load(spec: str) -> None:
    """Import every plugin of a ``plugins`` value once (a file by its path, else a module by its name)."""
    for plugin in split(spec):
        if _is_file(plugin):
            _load_file(Path(plugin).expanduser().resolve())
        elif plugin.endswith(".py") or os.sep in plugin:
            raise UserError(f"Plugin file '{plugin}' does not exist.")
        else:
            _import(plugin, lambda name=plugin: importlib.import_module(name))


def load_installed() -> None:
    """The variants of installed packages (their ``sffn_lab.variants`` entry points)."""
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        _import(entry_point.value, entry_point.load)


def from_environment() -> list[str]:
    """The plugins ``$SFFN_PLUGINS`` names (separated by ``os.pathsep``)."""
    return [p for p in os.environ.get(ENV_VARIABLE, "").split(os.pathsep) if p.strip()]


def _is_file(plugin: str) -> bool:
    return Path(plugin).expanduser().is_file()


def _load_file(path: Path) -> None:
    name = f"sffn_plugin_{abs(hash(str(path))):x}_{path.stem}"
    if name in sys.modules:
        return

    def run() -> None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise

    _import(str(path), run)


def _import(what: str, run) -> None:
    """Run an import, answering a failure as a ``UserError`` that names the plugin."""
    try:
        run()
    except UserError:
        raise
    except ModuleNotFoundError as exc:
        raise UserError(f"Plugin '{what}' cannot be imported: {exc}. Give a file path or an importable "
                        "module.") from None
    except Exception as exc:  # the plugin's own code failed: say which plugin and why
        raise UserError(f"Plugin '{what}' failed to load: {type(exc).__name__}: {exc}") from None
