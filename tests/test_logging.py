"""One ``runactors`` logger hierarchy: every logger of ``actors/`` and ``client/`` is under
``runactors``, whose handler says what Python's last resort would, with the package named,
and only while the program configured no logging."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from scripts import run_script

ROOT = Path(__file__).resolve().parent.parent

_LOGGERS = """
import importlib, json, logging, pkgutil
import client, actors
for package in (actors, client):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
manager = logging.root.manager
print(json.dumps({
    "names": sorted(manager.loggerDict),
    "handlers": [type(h).__name__ for h in logging.getLogger("runactors").handlers],
}))
"""


def test_every_logger_of_the_packages_is_under_runactors() -> None:
    done = run_script(_LOGGERS)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    names = found["names"]
    ours = [n for n in names if n.split(".")[0] in ("actors", "client")]
    assert ours == [], ours
    assert {"runactors.runtime", "runactors.spool", "runactors.status_server"} <= set(names)
    assert found["handlers"] == ["_LastResort"]  # Python's lastResort never prints them bare


def test_each_module_names_its_logger_under_runactors() -> None:
    """A module's logger is named by a literal under ``runactors.`` (not ``__name__``)."""
    for package in ("actors", "client"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
                    continue
                func = node.value.func
                if isinstance(func, ast.Attribute) and func.attr == "getLogger":
                    (arg,) = node.value.args
                    assert isinstance(arg, ast.Constant), path
                    assert str(arg.value).startswith("runactors."), (path, arg.value)


_WARN = """
import logging
import client
if CONFIGURED:
    logging.basicConfig(format="%(levelname)s %(name)s %(message)s")
logging.getLogger("runactors.runtime").warning("at exit: %s", "the flush was lost")
logging.getLogger("runactors.runtime").info("not shown")
"""


def test_with_no_logging_configured_a_warning_reads_with_the_package_named() -> None:
    done = run_script(_WARN.replace("CONFIGURED", "False"))
    assert done.returncode == 0, done.stderr
    assert done.stderr == "runactors: at exit: the flush was lost\n"


def test_once_logging_is_configured_its_handlers_alone_print() -> None:
    done = run_script(_WARN.replace("CONFIGURED", "True"))
    assert done.returncode == 0, done.stderr
    assert done.stderr == "WARNING runactors.runtime at exit: the flush was lost\n"
