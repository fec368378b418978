"""Ray start-up shared by every job: an embedded local Ray, or the cluster we were submitted to."""

from __future__ import annotations

import logging
import os

__all__ = ["ray_init", "worker_env", "SECRET_ENV"]

log = logging.getLogger(__name__)

# What a Ray worker needs to reach the same storage and models as the driver. Never credentials: whatever
# travels through Ray (task and actor arguments, runtime_env) lands in Ray's logs and object store. Nodes
# use their own credential chain: an instance profile on a cluster, the environment a local node (or the
# embedded Ray, started by this process) was started with.
WORKER_ENV = ("RAYWEIGHTS_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
              "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# the key id travels with its secret or not at all ("partial credentials" beside an instance profile)
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def worker_env() -> dict[str, str]:
    """The driver's settings that Ray workers get (endpoint, region, offline flags): never a secret."""
    return {k: v for k, v in os.environ.items() if k in WORKER_ENV and v}


def ray_init(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Connect to Ray once per process.

    * ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) -> join that cluster;
    * otherwise start an embedded local Ray on this machine (``num_cpus`` defaults to all cores).

    The package's own directory is shipped to local workers through ``PYTHONPATH`` so that jobs
    run from a source checkout work without an install.
    """
    import ray                     # only where Ray starts: configs and checks stay free of its import cost

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"log_to_driver": not quiet, "ignore_reinit_error": True}
    if address:
        ray.init(address=address, **kwargs)
        log.info("connected to Ray cluster at %s", address)
        return
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pythonpath = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH", "")) if p)
    env_vars = {"PYTHONPATH": pythonpath, **worker_env()}
    # address="local": never join whatever cluster a (possibly stale) ray_current_cluster file names
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env_vars}, **kwargs)
    log.info("started an embedded local Ray (%s CPUs)", ray.cluster_resources().get("CPU"))
