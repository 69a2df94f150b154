"""``patch_mlflow_autologging``: MLflow's own autologging flavors log through runactors in one
call, exactly what they log with MLflow's client, and ``undo()`` gives them MLflow's class back.

Each flavor test runs the same tiny, seeded fit three times into a real SQLite store: with
MLflow's client, patched, and after ``undo()``, and compares what the store holds (read back
with MLflow's own client). The patch list is checked against the installed MLflow's source.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.autologging_utils.client import (
    MlflowAutologgingQueueingClient as MlflowsClient,
)

from client import AutologgingPatch, QueueingClient, patch_mlflow_autologging
from client._autologging import NAME, PATCHED_MODULES, AutologgingClient

REPO = Path(__file__).resolve().parents[1]
# Where MLflow defines the class and re-exports it: the flavors import it from there, so
# rebinding it there would reach no flavor already imported (the import hook covers later ones).
DEFINING_MODULES = {"mlflow.utils.autologging_utils.client", "mlflow.utils.autologging_utils"}


def logged(store: MlflowClient, run_id: str) -> dict[str, Any]:
    """Everything a flavor logged to the run, as the store holds it, without timestamps (they
    are the wall clock of each call). No tag is excluded: the three runs of a test have the same
    name, source, user and commit (one process, ``run_name`` given)."""
    run = store.get_run(run_id)
    histories = {
        key: sorted(
            (m.step, m.value, m.dataset_name, m.dataset_digest, m.model_id)
            for m in store.get_metric_history(run_id, key)
        )
        for key in run.data.metrics
    }
    inputs = sorted(
        (
            d.dataset.name,
            d.dataset.digest,
            d.dataset.source_type,
            d.dataset.schema,
            d.dataset.profile,
            sorted((t.key, t.value) for t in d.tags),
        )
        for d in run.inputs.dataset_inputs
    )
    return {
        "params": run.data.params,
        "tags": run.data.tags,
        "metrics": histories,
        "inputs": inputs,
    }


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[QueueingClient]]:
    """The clients the patched flavors make, kept to read their status; closed at the end."""
    clients: list[QueueingClient] = []
    init = AutologgingClient.__init__

    def keep(self: AutologgingClient, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        clients.append(self)

    monkeypatch.setattr(AutologgingClient, "__init__", keep)
    yield clients
    for client in clients:
        client.close()


def tiny_classification() -> tuple[Any, Any]:
    """200 rows of 4 features: the boosting flavors plot each feature's importance per fit."""
    from sklearn.datasets import make_classification

    return make_classification(n_samples=200, n_features=4, random_state=0)


def compare_with_mlflows_client(
    flavor: ModuleType,
    fit: Callable[[], object],
    store: MlflowClient,
    made: list[QueueingClient],
    **client_kwargs: Any,
) -> None:
    """The same fit with MLflow's client, patched, and after undo() logs the same."""
    original = getattr(flavor, NAME)
    assert original is MlflowsClient

    def run() -> str:
        with mlflow.start_run(run_name="fit") as active:
            fit()
        return str(active.info.run_id)

    flavor.autolog(log_models=False, silent=True)  # type: ignore[attr-defined]
    try:
        baseline = run()
        with patch_mlflow_autologging(**client_kwargs) as handle:
            assert getattr(flavor, NAME) is AutologgingClient
            patched = run()
        assert not handle.active
        assert getattr(flavor, NAME) is original
        after = run()
    finally:
        flavor.autolog(disable=True)  # type: ignore[attr-defined]

    expected = logged(store, baseline)
    assert expected["params"] and expected["metrics"], expected  # the fit logged something
    assert logged(store, patched) == expected
    assert logged(store, after) == expected
    # The patched run went through runactors' client, made with the patch's options.
    statuses = [status for client in made for status in client.status().runs]
    assert [s.run_id for s in statuses] == [patched], statuses
    assert statuses[0].logged["params"] > 0 and not statuses[0].errors, statuses[0]
    for client in made:
        for key, value in client_kwargs.items():
            assert getattr(client._config, key) == value, key


@pytest.mark.slow  # more than a second: autolog() and fits
def test_sklearn_logs_what_it_logs_with_mlflows_client(
    store: MlflowClient, made: list[QueueingClient], executor: str
) -> None:
    """params, tags, training metrics and the dataset, through the client on both executors.
    A regressor: a classifier's autologging draws plots, a second per fit."""
    import mlflow.sklearn
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    X, y = load_diabetes(return_X_y=True)
    compare_with_mlflows_client(
        mlflow.sklearn,
        lambda: Ridge(alpha=0.5).fit(X, y),
        store,
        made,
        executor=executor,
        retry_timeout=5.0,
    )


@pytest.mark.slow  # more than a second: autolog() and fits
def test_lightgbm_logs_what_it_logs_with_mlflows_client(
    store: MlflowClient, made: list[QueueingClient], tmp_path: Path
) -> None:
    """params and datasets through the client, per-iteration histories through MLflow's batch
    logger, early-stopping metrics through the client; options (spool_dir) applied."""
    lightgbm = pytest.importorskip("lightgbm", reason="lightgbm is not installed (test extras)")
    import mlflow.lightgbm

    X, y = tiny_classification()
    params = {
        "objective": "binary",
        "num_leaves": 4,
        "verbose": -1,
        "seed": 0,
        "deterministic": True,
        "num_threads": 1,
    }

    def fit() -> object:
        train = lightgbm.Dataset(X[:150], y[:150])
        valid = lightgbm.Dataset(X[150:], y[150:], reference=train)
        return lightgbm.train(
            params,
            train,
            num_boost_round=8,
            valid_sets=[valid],
            valid_names=["valid"],
            callbacks=[lightgbm.early_stopping(2, verbose=False)],
        )

    spool = str(tmp_path / "spool")
    compare_with_mlflows_client(mlflow.lightgbm, fit, store, made, spool_dir=spool)


@pytest.mark.slow  # more than a second: autolog() and fits
def test_xgboost_logs_what_it_logs_with_mlflows_client(
    store: MlflowClient, made: list[QueueingClient]
) -> None:
    """As LightGBM, with flush_interval applied to the flavor's clients."""
    xgboost = pytest.importorskip("xgboost", reason="xgboost is not installed (test extras)")
    import mlflow.xgboost

    X, y = tiny_classification()
    params = {"objective": "binary:logistic", "max_depth": 2, "seed": 0, "nthread": 1}

    def fit() -> object:
        train = xgboost.DMatrix(X[:150], y[:150])
        valid = xgboost.DMatrix(X[150:], y[150:])
        return xgboost.train(
            params,
            train,
            num_boost_round=8,
            evals=[(valid, "valid")],
            early_stopping_rounds=2,
            verbose_eval=False,
        )

    compare_with_mlflows_client(mlflow.xgboost, fit, store, made, flush_interval=30.0)


def _binding_modules(package: Path) -> tuple[set[str], list[str]]:
    """Modules of the installed MLflow that bind NAME at module level (an import, assignment
    or class), and every other use of the name that a rebinding would not reach (an import
    inside a function, ``module.NAME``)."""
    binding: set[str] = set()
    escaping: list[str] = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if NAME not in text:
            continue
        parts = path.relative_to(package.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        tree = ast.parse(text)
        top_level: set[int] = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom | ast.Import) and any(
                (a.asname or a.name) == NAME for a in node.names
            ):
                binding.add(module)
                top_level.add(id(node))
            elif (isinstance(node, ast.ClassDef) and node.name == NAME) or (
                isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == NAME for t in node.targets)
            ):
                binding.add(module)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom | ast.Import)
                and id(node) not in top_level
                and any(a.name == NAME for a in node.names)
            ):
                escaping.append(f"{module}:{node.lineno}: import inside a function")
            elif isinstance(node, ast.Attribute) and node.attr == NAME:
                escaping.append(f"{module}:{node.lineno}: attribute access")
    return binding, escaping


def test_the_patch_list_is_what_the_installed_mlflow_binds() -> None:
    """An MLflow release that moves the name (a new flavor, a renamed module, an import inside
    a function) fails here, not in a user's fit."""
    binding, escaping = _binding_modules(Path(mlflow.__file__).parent)
    assert binding >= DEFINING_MODULES  # the scan found the definition: it works
    assert binding - DEFINING_MODULES == set(PATCHED_MODULES)
    assert escaping == []


@pytest.mark.slow  # a fresh interpreter
def test_a_flavor_imported_after_the_call_is_patched(tmp_path: Path) -> None:
    """In a fresh interpreter, so that the import is truly the first: the patch imports no
    flavor (not mlflow.pytorch), the import hook patches mlflow.lightgbm when it is imported,
    and undo() restores MLflow's class and removes the hook."""
    pytest.importorskip("lightgbm", reason="lightgbm is not installed (test extras)")
    script = textwrap.dedent(
        """
        import sys
        from client import patch_mlflow_autologging
        from client._autologging import AutologgingClient, PATCHED_MODULES

        handle = patch_mlflow_autologging(flush_interval=5.0)
        flavors = [m for m in sys.modules if m.split(".")[:2] in (
            ["mlflow", "sklearn"], ["mlflow", "lightgbm"], ["mlflow", "xgboost"],
            ["mlflow", "pytorch"], ["mlflow", "paddle"])]
        assert flavors == [], flavors

        import mlflow.lightgbm
        from mlflow.utils.autologging_utils.client import MlflowAutologgingQueueingClient
        assert mlflow.lightgbm.MlflowAutologgingQueueingClient is AutologgingClient
        assert mlflow.lightgbm.__spec__.loader is mlflow.lightgbm.__loader__
        assert type(mlflow.lightgbm.__loader__).__name__ == "SourceFileLoader"
        made = AutologgingClient()
        made.close()
        assert made._config.flush_interval == 5.0

        handle.undo()
        assert mlflow.lightgbm.MlflowAutologgingQueueingClient is MlflowAutologgingQueueingClient
        assert not any("_PatchingFinder" in type(f).__name__ for f in sys.meta_path)
        import mlflow.xgboost  # after undo: not patched
        assert mlflow.xgboost.MlflowAutologgingQueueingClient is MlflowAutologgingQueueingClient
        print("ok")
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_options_are_checked_at_the_call(tmp_path: Path) -> None:
    """A bad option fails at the call, naming it, and patches nothing."""
    import mlflow.sklearn

    cases: list[tuple[dict[str, Any], str]] = [
        ({"flush_interval": -1}, "flush_interval"),
        ({"executor": "fork"}, "executor"),
        ({"flush_intervall": 1.0}, "flush_intervall"),
        ({"tracking_uri": "sqlite:///x.db"}, "tracking_uri"),
        ({"spool_dir": str(Path(__file__))}, "spool_dir"),
    ]
    for kwargs, key in cases:
        with pytest.raises(MlflowException, match=key) as caught:
            patch_mlflow_autologging(**kwargs)
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
        assert getattr(mlflow.sklearn, NAME) is MlflowsClient


def test_a_second_patch_raises_until_the_first_is_undone(tracking_uri: str) -> None:
    import mlflow.sklearn

    handle = patch_mlflow_autologging(retry_timeout=1.0)
    try:
        assert isinstance(handle, AutologgingPatch)
        with pytest.raises(MlflowException, match="already patched") as caught:
            patch_mlflow_autologging()
        assert caught.value.error_code == "INVALID_STATE"
        assert getattr(mlflow.sklearn, NAME) is AutologgingClient
        made = AutologgingClient()
        made.close()
        assert made._config.retry_timeout == 1.0  # the first patch's options
    finally:
        handle.undo()
    handle.undo()  # a second undo does nothing
    assert getattr(mlflow.sklearn, NAME) is MlflowsClient
    with patch_mlflow_autologging() as again:  # undone: may patch again
        assert getattr(mlflow.sklearn, NAME) is AutologgingClient
    assert not again.active and getattr(mlflow.sklearn, NAME) is MlflowsClient


def test_undo_keeps_what_was_assigned_after_the_patch() -> None:
    """A class assigned to a flavor module while patched is the user's: undo leaves it."""
    import mlflow.sklearn

    class Mine(QueueingClient):
        pass

    with patch_mlflow_autologging():
        mlflow.sklearn.MlflowAutologgingQueueingClient = Mine  # type: ignore[attr-defined]
    try:
        assert getattr(mlflow.sklearn, NAME) is Mine
    finally:
        mlflow.sklearn.MlflowAutologgingQueueingClient = MlflowsClient  # type: ignore[attr-defined]
