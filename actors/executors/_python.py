"""``python_main``: how runactors starts a fresh interpreter on one of its own modules.

Not ``python -m package.module``, which puts the current folder first on ``sys.path``: a
folder there named like one of runactors' packages (an ``actors/`` folder is common in actor
projects, a ``client/`` one anywhere) would be imported instead, and the child would fail or,
worse, run the user's code. With ``python -c`` the current folder is the entry ``''``,
dropped before anything is imported (absent under ``python -P``/``PYTHONSAFEPATH``: then the
first entry is a real one and is kept).
"""

from __future__ import annotations

import sys


def python_main(module: str, *args: str) -> list[str]:
    """The command that runs ``module.main()`` in a fresh interpreter of this Python, with
    ``args`` as ``sys.argv[1:]`` and the current folder not on ``sys.path``."""
    if not all(part.isidentifier() for part in module.split(".")):
        raise ValueError(f"not a module name: {module!r}")
    program = (
        "import sys\n"
        "if sys.path and sys.path[0] == '':\n"
        "    del sys.path[0]\n"
        f"from {module} import main\n"
        "main()\n"
    )
    return [sys.executable, "-c", program, *args]
