"""The driver of ``test_ray_cluster.py``'s sweep, run as a script in a process of its own (a
Ray driver joins one cluster per process, and the test process may already host the local Ray
of ``test_ray.py``):

    python cluster_sweep.py GCS_ADDRESS NODE_IP TRACKING_URI EXPERIMENT_ID SPOOL_DIR MARKER_DIR
                            TRIALS STEPS FLUSHED QUEUED

One Ray task per trial, even trials softly pinned to node ``a`` (the head), odd ones to node
``b``; each task gets the driver's ``QueueingClient`` pickled (configuration only) and logs one
run. An attempt on node ``b`` logs ``FLUSHED`` points and flushes them, queues ``QUEUED`` more,
writes ``MARKER_DIR/trial-N.json`` and waits for its node to be killed; Ray then retries the
trial (``max_retries=1``), and the soft affinity lets the retry run on the head. The last line
of stdout is the tasks' results as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from client import QueueingClient

RETRY_TIMEOUT = 30.0
WAIT_FOR_DEATH = 60.0  # an attempt on node b that outlives this fails the sweep


def loss_at(trial: int, step: int) -> float:
    return 1.0 / (trial + 1) / (step + 1)


def run_trial(
    client: QueueingClient,
    experiment_id: str,
    trial: int,
    steps: int,
    nodes: dict[str, str],
    marker_dir: str,
    flushed: int,
    queued: int,
) -> dict[str, Any]:
    """One attempt of one trial, in a Ray worker on either node."""
    node = {node_id: name for name, node_id in nodes.items()}[
        ray.get_runtime_context().get_node_id()
    ]
    run = client.create_run(
        experiment_id,
        run_name=f"trial-{trial}",
        tags={"sweep.trial": trial, "ray.node": node, "ray.pid": os.getpid()},
    )
    client.log_params(run, {"trial": trial, "lr": 0.1 * (trial + 1)})
    if node == "b":
        for step in range(flushed):
            client.log_metrics(run, {"loss": loss_at(trial, step)}, step=step)
        client.flush()  # these reach the store before the node dies
        for step in range(flushed, flushed + queued):  # these stay queued in memory
            client.log_metrics(run, {"loss": loss_at(trial, step)}, step=step)
        marker = os.path.join(marker_dir, f"trial-{trial}.json")
        with open(marker + ".tmp", "w") as file:
            json.dump({"pid": os.getpid(), "run_id": run.resolve()}, file)
        os.replace(marker + ".tmp", marker)
        time.sleep(WAIT_FOR_DEATH)
        raise RuntimeError(f"trial {trial}: node b was not stopped within {WAIT_FOR_DEATH} s")
    for step in range(steps):
        client.log_metrics(run, {"loss": loss_at(trial, step)}, step=step)
        client.flush(synchronous=False)
    client.set_terminated(run, "FINISHED")
    client.close()
    return {"trial": trial, "node": node, "pid": os.getpid(), "run_id": run.resolve(timeout=0)}


def cluster_nodes(timeout: float = 60.0) -> dict[str, str]:
    """``{"a": node ID, "b": node ID}``, by each node's custom resource, once both are up."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = {
            name: node["NodeID"]
            for node in ray.nodes()
            if node["Alive"]
            for name in ("a", "b")
            if f"node_{name}" in node["Resources"]
        }
        if len(nodes) == 2:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"both nodes not alive within {timeout} s: {ray.nodes()}")
        time.sleep(0.1)


def main(argv: list[str]) -> None:
    gcs_address, node_ip, uri, experiment_id, spool_dir, marker_dir = argv[:6]
    trials, steps, flushed, queued = (int(arg) for arg in argv[6:10])
    ray.init(address=gcs_address, _node_ip_address=node_ip, log_to_driver=False)
    nodes = cluster_nodes()
    here = ray.get_runtime_context().get_node_id()
    if here != nodes["a"]:
        raise RuntimeError(f"the driver joined node {here}, not the head {nodes['a']}")
    # journal_interval=0: a logged point is on disk (the write-ahead journal) when the call
    # returns, so the points queued before the marker survive the node's death.
    client = QueueingClient(
        uri, retry_timeout=RETRY_TIMEOUT, spool_dir=spool_dir, journal_interval=0
    )
    task = ray.remote(num_cpus=1, max_retries=1, retry_exceptions=False)(run_trial)
    refs = [
        task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(nodes["ab"[trial % 2]], soft=True)
        ).remote(client, experiment_id, trial, steps, nodes, marker_dir, flushed, queued)
        for trial in range(trials)
    ]
    results = ray.get(refs, timeout=180)
    client.close()  # never used here: nothing to send
    ray.shutdown()
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
