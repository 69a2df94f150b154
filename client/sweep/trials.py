"""The parent's bookkeeping of the trials: their runs, their results, and the runs it
must terminate itself when a trial's worker could not."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from client._client import QueueingClient
from client.sweep.board import Board
from client.sweep.messages import Progress, Snapshot, TrialResult, TrialSpec
from client.sweep.options import TRIAL_TAG

if TYPE_CHECKING:
    from client import PendingRunId
    from client.sweep.view import View


def create_trial_run(client: QueueingClient, spec: TrialSpec) -> PendingRunId:
    """Queue the creation of a trial's child run, in the parent: so the parent knows every
    trial run that exists, and can terminate it whatever becomes of the trial's worker."""
    tags = {MLFLOW_PARENT_RUN_ID: spec.parent_run_id, TRIAL_TAG: str(spec.number)}
    run = client.create_run(spec.experiment_id, tags=tags, run_name=f"trial-{spec.number}")
    client.flush(synchronous=False)
    return run


class Trials:
    """The parent's view of the trials: it tells the view their progress, collects their
    results and status snapshots (on its :class:`Board`), and terminates from the parent
    the runs of trials whose worker could not."""

    def __init__(self, client: QueueingClient, specs: list[TrialSpec], view: View) -> None:
        self._client = client
        self.specs = specs
        self.view = view
        epochs = specs[0].epochs if specs else 0
        self.board = Board(len(specs), epochs)
        self.run_ids: dict[int, str] = {}
        self.results: dict[int, TrialResult] = {}

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.specs)

    def progress(self, event: Progress) -> None:
        self.run_ids[event.trial] = event.run_id
        self.board.progress(event)
        self.view.progress(event, self.board)

    def snapshot(self, snapshot: Snapshot) -> None:
        self.board.snapshot(snapshot)

    def result(self, result: TrialResult, echo: bool = True) -> None:
        self.results[result.number] = result
        self.board.result(result)
        self.view.result(result, self.board, echo)

    def create_run(self, spec: TrialSpec) -> PendingRunId:
        return create_trial_run(self._client, spec)

    def end(
        self, spec: TrialSpec, status: str, error: str, creating: PendingRunId | None = None
    ) -> None:
        """End a trial that its worker did not end: terminate its run, if there is one (or
        will be: ``creating``, queued after its creation)."""
        run_id = self.run_ids.get(spec.number)
        run = creating if creating is not None else run_id
        if run is not None:
            self._client.set_terminated(run, status)
        self.result(TrialResult(spec.number, run_id, status, spec.params, {}, 0, 0.0, error))

    def sorted_results(self) -> list[TrialResult]:
        return [self.results[number] for number in sorted(self.results)]
