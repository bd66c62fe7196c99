"""``make rehearse-images`` (CI with CI_IMAGES=1): the kind quick start's config (k8s/overlays/local/run.yaml) run
through to report.html with every stage inside its own image, each rendered Job's container executed as the
Job would run it (its image and entrypoint, args, env from the rendered objects with test Secrets, volumes,
user; each index of an Indexed Job in turn) with ``buildah run``, SeaweedFS as the S3 store and the sample
mounted where the ingest Job mounts the data volume. Not named test_*.py: images/test.sh runs it.
REHEARSE_SET="key=value ..." adds overrides (e.g. data.limit=12 finetune.max_steps=4 for a shorter run);
REHEARSE_OUT (build/rehearse-images) receives report.html and the per-stage timings."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path, PurePosixPath

import pytest
from images_check import _buildah, pod_as_buildah_run

from pipeline.artifacts import report_page_key
from pipeline.config import load_config
from pipeline.k8s.objects import build_configmap, build_job, to_dict
from pipeline.stages import STAGES
from pipeline.store import open_store

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "k8s" / "overlays" / "local" / "run.yaml"


def _entrypoint(image: str) -> list[str]:
    proc = _buildah("inspect", "--type", "image", image)  # the whole JSON: older buildah has no {{json}} in --format
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["OCIv1"]["config"]["Entrypoint"]


@pytest.mark.timeout(3600)  # seven stages, each a buildah run (the suite's 600 s is for one test's work)
def test_the_kind_config_runs_to_report_html_with_every_stage_in_its_own_image(s3_bucket, s3_server, sample_dir,
                                                                                 tmp_path):
    registry, tag = os.environ["IMAGE_TEST_REF"].rsplit("/", 1)[0], os.environ["IMAGE_TEST_REF"].rsplit(":", 1)[1]
    config = load_config(LOCAL, [f"store.uri={s3_bucket}", f"k8s.image_registry={registry}", f"k8s.image_tag={tag}",
                                 f"k8s.s3_endpoint={os.environ['AWS_ENDPOINT_URL_S3']}",
                                 *shlex.split(os.environ.get("REHEARSE_SET", ""))])
    assert sample_dir.name == PurePosixPath(config.data.source).name  # the volume holds the sample's folder
    secrets = {config.k8s.s3_secret: {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                                 "AWS_REGION")}}
    folder = tmp_path / "configmap"
    folder.mkdir()
    for name, text in build_configmap(config).data.items():
        (folder / name).write_text(text)
    out = Path(os.environ.get("REHEARSE_OUT", REPO / "build" / "rehearse-images"))
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    for stage in STAGES:
        job = to_dict(build_job(config, stage))
        image = job["spec"]["template"]["spec"]["containers"][0]["image"]
        indexes = range(job["spec"]["completions"]) if job["spec"].get("completionMode") == "Indexed" else [None]
        started = time.monotonic()
        for index in indexes:
            volumes = {"config": str(folder), "data": str(sample_dir.parent)}
            for name in ("tmp", "cache", "dshm"):  # emptyDirs: fresh per pod, writable by the pod's user
                (tmp_path / f"{stage}-{index}-{name}").mkdir(mode=0o777)
                os.chmod(tmp_path / f"{stage}-{index}-{name}", 0o777)
                volumes[name] = str(tmp_path / f"{stage}-{index}-{name}")
            ctr = _buildah("from", image)
            assert ctr.returncode == 0, ctr.stderr
            name = ctr.stdout.strip()
            try:
                args = pod_as_buildah_run(job, index, _entrypoint(image), secrets, volumes)
                sep = args.index("--")
                proc = subprocess.run(["buildah", "--storage-driver", os.environ.get("BUILDAH_STORAGE_DRIVER", "vfs"),
                                       "run", "--isolation", os.environ.get("BUILDAH_ISOLATION", "chroot"), *args[:sep],
                                       name, *args[sep:]], capture_output=True, text=True, timeout=3600)
            finally:
                _buildah("rm", name)
            (out / f"{stage}{'' if index is None else f'-{index}'}.log").write_text(proc.stdout + proc.stderr)
            last = proc.stdout.strip().splitlines()[-1:] or [""]
            assert proc.returncode == 0 and "finished OK" in last[0], (stage, index, proc.stdout[-3000:],
                                                                        proc.stderr[-3000:])
        timings[stage] = round(time.monotonic() - started, 1)
        (out / "timings.json").write_text(json.dumps(timings, indent=1))
    store = open_store(s3_bucket)
    key = report_page_key(config.run.id)
    assert store.exists(key)
    (out / "report.html").write_text(store.get_text(key))
    print(f"report: {out / 'report.html'}; seconds per stage: {timings}; total {sum(timings.values()):.0f}s")
