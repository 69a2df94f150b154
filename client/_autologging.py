"""MLflow's own autologging through runactors, in one call: ``patch_mlflow_autologging``.

MLflow's flavors make their client inside each ``fit()`` with
``MlflowAutologgingQueueingClient()``, a name each flavor module bound when it was imported
(``from mlflow.utils.autologging_utils import MlflowAutologgingQueueingClient``) and looks up
in its own globals at fit time. So the name is rebound in every flavor module that holds it:
those already imported now, those imported later by an import hook (a ``sys.meta_path``
finder that patches the module right after it executes, so no flavor is imported here).
Rebinding the name where MLflow defines it would reach no flavor already imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import inspect
import logging
import sys
import threading
from collections.abc import Sequence
from types import ModuleType, TracebackType
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_STATE

from client._client import QueueingClient
from client._options import invalid, session_config

NAME = "MlflowAutologgingQueueingClient"

# Every module of MLflow that binds NAME at import and calls it in a flavor's fit (checked
# against the installed MLflow by tests/test_autologging.py). ``mlflow.sklearn.utils`` only
# receives the client made by ``mlflow.sklearn``: it binds nothing.
PATCHED_MODULES = (
    "mlflow.sklearn",
    "mlflow.lightgbm",
    "mlflow.xgboost",
    "mlflow.pytorch._lightning_autolog",
    "mlflow.paddle._paddle_autolog",
)

# The flavors' clients log to the runs of MLflow's current tracking URI, which they resolve
# (or pass) per client, so it is not an option of the patch.
_NOT_OPTIONS = ("self", "tracking_uri")
OPTIONS = tuple(
    name
    for name in inspect.signature(QueueingClient.__init__).parameters
    if name not in _NOT_OPTIONS
)

_logger = logging.getLogger("runactors.autologging")
_lock = threading.RLock()
_active: AutologgingPatch | None = None


class AutologgingClient(QueueingClient):
    """``QueueingClient`` with the options given to ``patch_mlflow_autologging``: the class
    the patched flavors call as ``MlflowAutologgingQueueingClient([tracking_uri])``.

    A module-level class (not one made per patch) so that its clients pickle by name; the
    options are those of the active patch, read when a client is made (options given here
    win). Once undone, the flavors call MLflow's class again.
    """

    def __init__(self, tracking_uri: str | None = None, **options: Any) -> None:
        with _lock:
            bound = dict(_active.options) if _active is not None else {}
        super().__init__(tracking_uri, **{**bound, **options})


def _check_options(options: dict[str, Any]) -> None:
    """Each option checked now, as ``QueueingClient`` would at every fit, so that a bad one
    fails at the call, naming it, not inside a user's ``fit()``."""
    for key in options:
        if key == "tracking_uri":
            raise invalid(
                "Invalid option 'tracking_uri' for patch_mlflow_autologging: the flavors log "
                "to the runs of MLflow's tracking URI (mlflow.set_tracking_uri), and their "
                "clients use it."
            )
        if key not in OPTIONS:
            raise invalid(
                f"Invalid option {key!r} for patch_mlflow_autologging: expected some of "
                f"{list(OPTIONS)} (QueueingClient's options)."
            )
    session_config(
        None,
        options.get("executor", "thread"),
        options.get("max_workers"),
        options.get("flush_interval"),
        options.get("max_queued"),
        options.get("retry_timeout", 60.0),
        options.get("spool_dir"),
    )


class _PatchingLoader(importlib.abc.Loader):
    """Runs a flavor module as its own loader would, then patches it."""

    def __init__(self, loader: importlib.abc.Loader, patch: AutologgingPatch) -> None:
        self._loader = loader
        self._patch = patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # The module keeps its real loader (source lookups, resources): this one only runs it.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._patch._patch_module(module)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    """Finds a flavor module with the finders after it and wraps its loader."""

    def __init__(self, patch: AutologgingPatch) -> None:
        self._patch = patch

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self._patch.modules:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module"):
            spec.loader = _PatchingLoader(loader, self._patch)
        return spec


class AutologgingPatch:
    """What ``patch_mlflow_autologging`` did, to be undone: ``undo()``, or a ``with`` block."""

    def __init__(self, options: dict[str, Any], modules: Sequence[str] = PATCHED_MODULES) -> None:
        self.options = options
        self.modules = tuple(modules)
        self.originals: dict[str, Any] = {}  # module name -> what it bound before the patch
        self._finder = _PatchingFinder(self)
        self._undone = False

    @property
    def active(self) -> bool:
        """Whether the flavors use runactors' client through this patch now."""
        return not self._undone

    def _start(self) -> None:
        sys.meta_path.insert(0, self._finder)
        for name in self.modules:
            module = sys.modules.get(name)
            if module is not None:
                self._patch_module(module)

    def _patch_module(self, module: ModuleType) -> None:
        with _lock:
            if self._undone or module.__name__ in self.originals:
                return
            if not hasattr(module, NAME):
                _logger.warning(
                    "%s does not bind %s in this MLflow: its autologging is not switched to "
                    "runactors.",
                    module.__name__,
                    NAME,
                )
                return
            self.originals[module.__name__] = getattr(module, NAME)
            setattr(module, NAME, AutologgingClient)

    def undo(self) -> None:
        """Rebinds, in every module patched, the class it bound before (MLflow's), unless
        something else was assigned since, and removes the import hook. Clients already made
        stay runactors' clients. A second call does nothing."""
        global _active
        with _lock:
            if self._undone:
                return
            self._undone = True
            try:
                sys.meta_path.remove(self._finder)
            except ValueError:
                pass
            for name, original in self.originals.items():
                module = sys.modules.get(name)
                if module is not None and getattr(module, NAME, None) is AutologgingClient:
                    setattr(module, NAME, original)
            if _active is self:
                _active = None

    def __enter__(self) -> AutologgingPatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return (
            f"AutologgingPatch({state}, options={self.options!r}, patched={list(self.originals)})"
        )


def patch_mlflow_autologging(**client_kwargs: Any) -> AutologgingPatch:
    """Makes every MLflow autologging flavor that uses ``MlflowAutologgingQueueingClient``
    (scikit-learn, LightGBM, XGBoost, PyTorch Lightning, Paddle; also those imported after
    the call) use ``QueueingClient(**client_kwargs)``; returns the handle that undoes it.

    Args:
        client_kwargs: ``QueueingClient``'s options (``executor``, ``max_workers``,
            ``flush_interval``, ``max_queued``, ``retry_timeout``, ``spool_dir``), for every
            client the flavors make; not ``tracking_uri`` (MLflow's is used, as by MLflow).

    Raises:
        MlflowException: an invalid option (``INVALID_PARAMETER_VALUE``, naming it), or a
            patch already active (``INVALID_STATE``): undo it first.
    """
    global _active
    _check_options(client_kwargs)
    with _lock:
        if _active is not None:
            raise MlflowException(
                "MLflow's autologging is already patched by patch_mlflow_autologging "
                f"(options {_active.options!r}): undo() that patch before patching again.",
                INVALID_STATE,
            )
        patch = AutologgingPatch(dict(client_kwargs))
        _active = patch
        patch._start()
    return patch
