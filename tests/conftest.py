"""Shared fixtures: a real S3 endpoint on loopback (moto's server) and one embedded Ray."""

from __future__ import annotations

import os
import socket
import sys
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("MPLBACKEND", "Agg")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models: one torch thread is far faster than two on the shared 2-core box.  Use with
    ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``; restores the count afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# moto accepts any credentials. They are in the environment from the start, so every Ray that the tests
# start inherits them, as a cluster node has its own credential chain: rayweights never sends them through Ray.
for _k, _v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the whole session; sets the AWS environment."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                             "AWS_REGION", "AWS_ENDPOINT_URL", "RAYWEIGHTS_S3_ENDPOINT")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": endpoint, "RAYWEIGHTS_S3_ENDPOINT": endpoint})
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3_uri(s3_server):
    """A fresh ``s3://bucket/prefix`` (bucket created through boto3 against the loopback server)."""
    import boto3

    bucket = f"rw-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/zoos/test"


@pytest.fixture(scope="module")
def ray_local():
    """An embedded local Ray shared by the tests of one module (starting Ray costs seconds).  A fresh
    one per module: state a module leaves in a long-lived Ray (Ray Data's cluster-wide autoscaling
    coordinator after Ray Train runs that were killed on purpose) once made the next module's
    actor-pool zoo build wait for ever."""
    import ray

    from rayweights.runtime import ray_init

    if ray.is_initialized():
        ray.shutdown()
    ray_init(num_cpus=2)
    yield ray
    ray.shutdown()


# The `ray` command of the Python running the tests (its venv need not be activated).
RAY_CLI = os.path.join(os.path.dirname(sys.executable), "ray")


class HeadCluster:
    """A `ray start --head` cluster of its own (private temp dir, every port a free one)."""

    def __init__(self, tmpdir: str, dashboard: str, env: dict):
        self.tmpdir, self.dashboard, self.env = tmpdir, dashboard, env

    def submit(self, entrypoint: list[str], timeout: int = 600):
        """`ray job submit --working-dir <repo> -- <entrypoint>`; retries while the job agent is
        still starting ("No available agent"), returns the CompletedProcess of the last try."""
        import json
        import subprocess
        import time
        from pathlib import Path

        root = str(Path(__file__).resolve().parents[1])
        for _ in range(20):
            job = subprocess.run(
                [RAY_CLI, "job", "submit", "--address", self.dashboard, "--working-dir", root, "--runtime-env-json",
                 json.dumps({"excludes": ["runs/", ".git/", "**/__pycache__"]}), "--", *entrypoint],
                env=self.env, capture_output=True, text=True, timeout=timeout)
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(3)
        return job


@pytest.fixture()
def ray_head_cluster():
    """A local cluster to `ray job submit` to, next to the session's embedded Ray.

    Every port is a free one: with the defaults its dashboard agent would try the port (52365)
    that the embedded Ray already holds, and the job server would answer "No available agent"
    for ever.  Torn down by killing only this cluster's processes: `ray stop` would also kill the
    session's embedded Ray."""
    import subprocess

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    ports = {"--dashboard-agent-listen-port": _free_port(), "--dashboard-agent-grpc-port": _free_port(),
             "--metrics-export-port": _free_port(), "--runtime-env-agent-port": _free_port(),
             "--node-manager-port": _free_port(), "--object-manager-port": _free_port(),
             "--ray-client-server-port": _free_port()}
    tmpdir = f"/tmp/rwj{os.getpid()}-{uuid.uuid4().hex[:6]}"
    start = subprocess.run([RAY_CLI, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}",
                            "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
                            f"--temp-dir={tmpdir}", "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())],
                           env=env, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        yield HeadCluster(tmpdir, f"http://127.0.0.1:{dash}", env)
    finally:
        _stop_cluster(tmpdir)


def _stop_cluster(tmpdir: str) -> None:
    import shutil

    import psutil

    me = os.getpid()
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != me and any(tmpdir in a for a in (p.info["cmdline"] or [])):
                procs += [p, *p.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    shutil.rmtree(tmpdir, ignore_errors=True)


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="also run the long tier (tests marked `long`: minutes each on 2 cores; tests/README.md)")


def pytest_collection_modifyitems(config, items):
    """The long tier runs only with ``--long``; without it its tests are reported as skipped."""
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long tier: run with --long (tests/README.md)")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """A test that took over a minute (setup, call or teardown) is named as it finishes, so a CI
    log that ends early (the job's time limit) still says where the time went."""
    if report.duration > 60:
        sys.stderr.write(f"\n[{report.duration:.0f} s {report.when}] {report.nodeid}\n")
