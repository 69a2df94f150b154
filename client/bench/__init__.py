"""``runactors bench``: runactors against MLflow's own clients, one scenario per speed goal.

One module per concern: the workloads and contenders (:mod:`._contenders`), the scenarios
(:mod:`._scenarios`), the local ``mlflow server`` (:mod:`._server`), the scale measurement's
subprocess (:mod:`._scale`), results (:mod:`._results`), the report and plot
(:mod:`._report`) and the click command (:mod:`._command`).
"""

from client.bench._command import bench

__all__ = ["bench"]
