"""A multi-node Ray cluster on this machine for the tests: a head with no CPUs and worker nodes,
each a real raylet with its own resources (``ray.cluster_utils.Cluster``).

The test process starts the nodes but never connects to them; the jobs run as separate driver
processes with ``RAY_ADDRESS`` set, as on a real cluster.  ``kill_node`` removes a worker node
abruptly (as a spot instance vanishes), ``add_node`` adds a replacement (as an autoscaler would).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiNodeCluster:
    """Head (0 CPUs, ``head_resources``) + ``workers`` nodes of ``worker_args`` each."""

    def __init__(self, workers: int = 2, worker_args: dict | None = None, head_resources: dict | None = None):
        from ray._common.utils import get_ray_address_file
        from ray.cluster_utils import Cluster

        # Cluster writes the head's address to Ray's default temp folder (not the nodes' temp_dir), which
        # does not exist on a machine where Ray never ran before
        os.makedirs(os.path.dirname(get_ray_address_file(None)), exist_ok=True)

        self.tmpdir = f"/tmp/rwmn-{uuid.uuid4().hex[:8]}"
        self.worker_args = {"num_cpus": 1, **(worker_args or {})}
        # the nodes' worker processes import rayweights from this checkout; the env is theirs from the start
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), saved) if p)
        try:
            for tries in range(4):        # a loaded machine can miss Ray's 30 s start-up deadline of a node
                try:
                    self.cluster = Cluster(initialize_head=True, connect=False, head_node_args={
                        "num_cpus": 0, "gcs_server_port": _free_port(), "temp_dir": self.tmpdir,
                        "include_dashboard": False, "resources": dict(head_resources or {}),
                        "object_store_memory": 100 * 1024 * 1024})
                    break
                except Exception:  # noqa: BLE001
                    if tries == 3:
                        raise
                    time.sleep(5)
            self.workers = [self.add_node() for _ in range(workers)]
        finally:
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved
        self.env = {**os.environ, "RAY_ADDRESS": self.cluster.address,
                    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self, **args):
        for tries in range(4):
            try:
                return self.cluster.add_node(**{**self.worker_args, "object_store_memory": 100 * 1024 * 1024, **args})
            except Exception:  # noqa: BLE001 - Ray's 30 s start-up deadline, missed on a loaded machine
                if tries == 3:
                    raise
                time.sleep(5)

    def node_of(self, node_id: str):
        for n in self.cluster.worker_nodes:
            if n.node_id == node_id:
                return n
        return None

    def kill_node(self, node) -> None:
        """Every process of the node dies at once (no graceful drain), as when a spot node vanishes."""
        self.cluster.remove_node(node, allow_graceful=False)

    def replace(self, node):
        """Kill ``node`` and add a fresh worker node in its place (spot loss, then the autoscaler)."""
        self.kill_node(node)
        new = self.add_node()
        self.workers = [w for w in self.workers if w is not node] + [new]
        return new

    def run_job(self, args: list[str], **kw) -> subprocess.Popen:
        """A driver process against the cluster (``RAY_ADDRESS``), output to ``<tmpdir>/job-*.log``."""
        log = open(os.path.join(self.tmpdir, f"job-{uuid.uuid4().hex[:6]}.log"), "w")
        p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=self.env, stdout=log,
                             stderr=subprocess.STDOUT, text=True, **kw)
        p.log_path = log.name
        return p

    def shutdown(self) -> None:
        self.cluster.shutdown()


def wait_for(cond, timeout: float, what: str, every: float = 0.5):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
