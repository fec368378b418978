"""rayweights.runtime: what travels to Ray workers, and the embedded default."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rayweights.runtime import SECRET_ENV, worker_env

ROOT = Path(__file__).resolve().parents[1]


def test_worker_env_never_holds_a_secret(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "t0ken")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-ID")
    monkeypatch.setenv("RAYWEIGHTS_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    env = worker_env()
    assert env["RAYWEIGHTS_S3_ENDPOINT"] == "http://127.0.0.1:9" and env["AWS_REGION"] == "eu-west-1"
    assert not set(env) & set(SECRET_ENV)
    assert "s3cr3t" not in repr(env) and "t0ken" not in repr(env)


@pytest.mark.slow
@pytest.mark.s3
def test_a_secret_never_reaches_ray_logs_nor_written_objects(s3_uri):
    """A zoo build to S3-on-loopback with a distinctive secret in the driver's environment: the secret is
    nowhere under Ray's session folder (logs of the runtime-env agent, workers, raylet) nor in any object the
    build wrote. The job's own Ray inherits the environment it was started with, as a node would."""
    secret = "RWSECRET" + os.urandom(8).hex()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rw"))           # short: Ray's socket paths must fit 107 bytes
    try:
        _build_and_look(s3_uri, secret, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _build_and_look(s3_uri: str, secret: str, ray_tmp: Path) -> None:
    import boto3

    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": secret, "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""}
    job = subprocess.run([sys.executable, "jobs/build_zoo.py", "--config", "jobs/specs/tiny.yaml", "--output", s3_uri,
                          "--set", "max_tasks=1", "--set", "members_per_task=2", "--set", "hparams.epochs=[2,2]",
                          "--set", "keep_last=1", "--set", "resources.workers=1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
    sessions = list(ray_tmp.rglob("session_*"))
    assert sessions, f"no Ray session folder under {ray_tmp}"          # the check below looked somewhere real
    leaks = []
    for f in ray_tmp.rglob("*"):
        if f.is_file() and not f.is_symlink():
            try:
                if secret.encode() in f.read_bytes():
                    leaks.append(str(f.relative_to(ray_tmp)))
            except OSError:
                continue
    assert not leaks, f"the secret is in Ray's files: {leaks[:5]}"
    bucket, prefix = s3_uri[5:].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    assert any(k.endswith(".parquet") for k in keys)
    for k in keys:
        assert secret.encode() not in s3.get_object(Bucket=bucket, Key=k)["Body"].read(), k
