"""The search space and the data: scikit-learn's bundled digits, and the models' scores."""

from __future__ import annotations

import functools
import itertools
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow.entities import DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

if TYPE_CHECKING:
    from numpy.typing import NDArray

# The search space: each trial is one point of this grid, drawn in a seeded random order.
GRID: dict[str, tuple[Any, ...]] = {
    "loss": ("hinge", "log_loss", "modified_huber"),
    "alpha": (1e-5, 1e-4, 1e-3, 1e-2),
    "learning_rate": ("constant", "invscaling"),
    "eta0": (0.001, 0.01, 0.1),
}


def sample_trials(trials: int, seed: int) -> list[dict[str, Any]]:
    """``trials`` points of :data:`GRID` in a seeded random order (repeating past its size)."""
    names = list(GRID)
    points = [dict(zip(names, values, strict=True)) for values in itertools.product(*GRID.values())]
    random.Random(seed).shuffle(points)
    return [points[i % len(points)] for i in range(trials)]


@dataclass(frozen=True)
class Digits:
    """scikit-learn's digits, split once per process, and the inputs that describe it."""

    x_train: NDArray[np.float64]
    y_train: NDArray[np.int64]
    x_val: NDArray[np.float64]
    y_val: NDArray[np.int64]
    classes: NDArray[np.int64]
    inputs: list[DatasetInput]


@functools.lru_cache(maxsize=1)
def load_digits() -> Digits:
    """Load and split the digits (1,797 8x8 images) with a fixed seed, scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    x, y = sklearn_digits(return_X_y=True)
    x = x / 16.0
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    inputs = [
        _dataset_input(x_train, y_train, "digits-train", "training"),
        _dataset_input(x_val, y_val, "digits-val", "validation"),
    ]
    return Digits(x_train, y_train, x_val, y_val, np.unique(y), inputs)


def _dataset_input(
    x: NDArray[np.float64], y: NDArray[np.int64], name: str, context: str
) -> DatasetInput:
    """A ``DatasetInput`` entity for ``log_inputs``, its source the file scikit-learn ships."""
    import sklearn.datasets  # type: ignore[import-untyped]
    from mlflow.data.numpy_dataset import from_numpy

    source = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and warns that the URI is ambiguous.
        warnings.filterwarnings("ignore", message="The specified dataset source")
        dataset = from_numpy(x, targets=y, source=source.as_uri(), name=name)
    return DatasetInput(
        dataset._to_mlflow_entity(), [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
    )


def _scores(
    model: Any, x: NDArray[np.float64], y: NDArray[np.int64], classes: NDArray[np.int64]
) -> tuple[float, float]:
    """Accuracy, and the cross-entropy of the softmax of the decision scores (comparable
    across the grid's losses, not all of which give probabilities)."""
    scores = model.decision_function(x)
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.searchsorted(classes, y)
    accuracy = float(np.mean(classes[scores.argmax(axis=1)] == y))
    return accuracy, float(-log_probs[np.arange(len(rows)), rows].mean())


def evaluate(model: Any, data: Digits) -> dict[str, float]:
    """An epoch's metrics: training and validation accuracy, and the validation loss."""
    val_accuracy, val_loss = _scores(model, data.x_val, data.y_val, data.classes)
    return {
        "train_accuracy": float(model.score(data.x_train, data.y_train)),
        "val_accuracy": val_accuracy,
        "val_loss": val_loss,
    }


def batch_metrics(
    model: Any, x: NDArray[np.float64], y: NDArray[np.int64], classes: NDArray[np.int64]
) -> dict[str, float]:
    """A mini-batch's metrics (with ``--log-every-batch``), on the batch just trained."""
    accuracy, loss = _scores(model, x, y, classes)
    return {"batch_accuracy": accuracy, "batch_loss": loss}
