"""Shared fixtures: a real S3 endpoint on loopback (moto's server) and one embedded Ray."""

from __future__ import annotations

import os
import socket
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


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray shared by every test of the session (starting Ray costs seconds)."""
    import ray

    from rayweights.runtime import ray_init

    if not ray.is_initialized():
        ray_init(num_cpus=2)
    yield ray
    ray.shutdown()
