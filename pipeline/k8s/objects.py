"""Every Kubernetes object a run needs, built with the ``kubernetes`` client models (never templated YAML).

``build_run(config)`` returns the ConfigMap holding the resolved run config and one Job per stage. A Job
runs the stage's image, whose entrypoint (jobs/entrypoint.sh) runs ``ielts-distill stage <name>``: the
same code as the local executor. Secrets are only *referenced* (secretKeyRef / envFrom): no object built
here ever holds a secret value.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from kubernetes import client as k

from pipeline import __version__
from pipeline.config import RunConfig, dump_config
from pipeline.errors import ConfigError
from pipeline.k8s.images import stage_image
from pipeline.stages import SPECS, STAGES, StagePlan, StageSpec, spec

MIN_KUBERNETES = "1.29"  # podFailurePolicy onPodConditions, podReplacementPolicy, backoffLimitPerIndex (beta)
CONFIG_DIR = "/etc/ielts-distill"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"
CACHE_DIR = "/var/cache/ielts-distill"
HF_HOME = f"{CACHE_DIR}/huggingface"
UID = 10001  # the non-root user of every image (images/base/Dockerfile)
GPU_TAINT = "nvidia.com/gpu"  # the taint GPU node pools carry (whatever k8s.gpu_resource is requested)
GPU_NODE_LABEL = "nvidia.com/gpu.present"  # set by GPU feature discovery: CPU stages stay off those nodes
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
EXIT_CONFIG_ERROR = 2  # pipeline.errors.ConfigError.exit_code: retrying cannot help
EXIT_API_OUTAGE = 75  # the driver lost the API for longer than k8s.api_outage_s (EX_TEMPFAIL): its Job retries
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")


# --------------------------------------------------------------------------- names and labels


def job_name(config: RunConfig, stage: str) -> str:
    return f"ielts-{config.run.id}-{stage}"


def configmap_name(config: RunConfig) -> str:
    return f"ielts-{config.run.id}-config"


def run_selector(config: RunConfig) -> str:
    return f"ielts-distill/run={config.run.id}"


def labels(config: RunConfig, stage: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "ielts-distill",
        "app.kubernetes.io/instance": config.run.id,
        "app.kubernetes.io/version": _label_value(config.k8s.image_tag),
        "app.kubernetes.io/part-of": "ielts-distill",
        "app.kubernetes.io/managed-by": "ielts-distill",
        "ielts-distill/run": config.run.id,
    }
    if stage:
        out.update({"app.kubernetes.io/component": stage, "ielts-distill/stage": stage})
    return out


def job_labels(config: RunConfig, stage: str) -> dict[str, str]:
    """A Job's own labels: the stage's, plus the Kueue LocalQueue (k8s.queue_name) when set."""
    out = labels(config, stage)
    if config.k8s.queue_name:
        out[QUEUE_LABEL] = config.k8s.queue_name
    return out


def _label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9._-]", "-", text)[:63].strip("-._")
    return value or "unknown"


# --------------------------------------------------------------------------- per-stage choices


def image(config: RunConfig, stage: StageSpec | StagePlan) -> str:
    """``<registry>/<stage>:<tag>``; the CUDA build ``<stage>-cuda`` when the stage needs CUDA under the config;
    ``<registry>/<name>@sha256:...`` instead when k8s.image_digests holds the image's digest."""
    plan = stage if isinstance(stage, StagePlan) else stage.plan(config)
    return image_ref(config, stage_image(plan.spec, cuda=plan.cuda))


def image_ref(config: RunConfig, name: str) -> str:
    kc = config.k8s
    digest = kc.image_digests.get(name)
    return f"{kc.image_registry.rstrip('/')}/{name}" + (f"@{digest}" if digest else f":{kc.image_tag}")


def stage_resources(config: RunConfig, stage: StagePlan) -> dict[str, str]:
    unknown = set(config.k8s.resources) - set(STAGES)
    if unknown:
        raise ConfigError(f"k8s.resources.{sorted(unknown)[0]}: unknown stage (stages: {', '.join(STAGES)})")
    res = dict(stage.spec.resources[config.k8s.profile])
    for key, value in config.k8s.resources.get(stage.name, {}).items():
        if key not in res:
            raise ConfigError(f"k8s.resources.{stage.name}.{key}: unknown resource (use cpu, memory, ephemeral-storage)")
        if not _QUANTITY.match(str(value)):
            raise ConfigError(f"k8s.resources.{stage.name}.{key}: {value!r} is not a Kubernetes quantity")
        res[key] = str(value)
    return res


def _api_key_envs(stage: StagePlan) -> list[tuple[str, bool]]:
    """(env var name, optional) of the LLM key a stage needs; optional when the server is embedded."""
    llm = stage.llm
    if llm is None or not llm.api_key_env:
        return []
    return [(llm.api_key_env, bool(llm.embedded))]


def _is_s3(config: RunConfig) -> bool:
    return config.store.uri.startswith("s3://")


def _store_path(config: RunConfig) -> str | None:
    """The store directory to mount the k8s.store_claim PVC at (None for S3)."""
    if _is_s3(config):
        return None
    path = config.store.uri.removeprefix("file://")
    if not config.k8s.store_claim or not PurePosixPath(path).is_absolute():
        raise ConfigError(f"store.uri {config.store.uri!r}: Jobs need a store they all reach: use s3://bucket/prefix, "
                          "or an absolute path together with k8s.store_claim (a ReadWriteMany PVC)")
    return path


# --------------------------------------------------------------------------- objects


def refuse_url_credentials(config: RunConfig) -> None:
    """Rendered objects carry the config (ConfigMap) and endpoints (env): a URL holding credentials
    (``http://user:secret@host``, ``?api-key=``) is refused with one line pointing to the Secret it belongs in."""
    from pipeline.redact import credential_fields

    for path, masked in credential_fields(config.model_dump(mode="json")):
        secret = config.k8s.s3_secret if path.startswith(("store.", "k8s.s3")) else config.k8s.llm_secret
        raise ConfigError(f"{path} ({masked}) holds credentials in its URL, which would be written into the "
                          f"Kubernetes objects: remove them and put them in the Secret '{secret}'")


def build_configmap(config: RunConfig) -> k.V1ConfigMap:
    refuse_url_credentials(config)
    return k.V1ConfigMap(
        api_version="v1", kind="ConfigMap",
        metadata=k.V1ObjectMeta(name=configmap_name(config), namespace=config.k8s.namespace, labels=labels(config)),
        data={"config.yaml": dump_config(config)})


def _env(config: RunConfig, stage: StagePlan) -> list[k.V1EnvVar]:
    env = [
        k.V1EnvVar(name="IELTS_STAGE", value=stage.name),
        k.V1EnvVar(name="IELTS_CONFIG", value=CONFIG_FILE),
        k.V1EnvVar(name="HOME", value="/tmp"),
        k.V1EnvVar(name="XDG_CACHE_HOME", value=CACHE_DIR),
        k.V1EnvVar(name="HF_HOME", value=HF_HOME),
        k.V1EnvVar(name="MPLCONFIGDIR", value="/tmp/matplotlib"),
    ]
    launcher = stage.launcher
    if launcher:  # jobs/entrypoint.py runs `<launcher> stage NAME` (torchrun: one process per GPU)
        env.append(k.V1EnvVar(name="IELTS_LAUNCHER", value=shlex.join(launcher)))
    if stage.shards is not None:  # Kubernetes sets JOB_COMPLETION_INDEX itself; Shard.from_env needs the count
        env.append(k.V1EnvVar(name="JOB_COMPLETION_COUNT", value=str(stage.shards)))
    if config.k8s.s3_endpoint:
        env.append(k.V1EnvVar(name="AWS_ENDPOINT_URL_S3", value=config.k8s.s3_endpoint))
    for name, optional in _api_key_envs(stage):
        ref = k.V1SecretKeySelector(name=config.k8s.llm_secret, key=name, optional=optional or None)
        env.append(k.V1EnvVar(name=name, value_from=k.V1EnvVarSource(secret_key_ref=ref)))
    return env


def _volumes(config: RunConfig, res: dict[str, str], shm: bool, data: bool) -> tuple[list[k.V1Volume], list[k.V1VolumeMount]]:
    """config, /tmp and cache; /dev/shm when ``shm``; the store PVC (directory store); the data PVC when ``data``
    (the stage reads data.source); the model cache PVC."""
    cache_limit = res["ephemeral-storage"]
    volumes = [
        k.V1Volume(name="config", config_map=k.V1ConfigMapVolumeSource(name=configmap_name(config))),
        k.V1Volume(name="tmp", empty_dir=k.V1EmptyDirVolumeSource(size_limit="1Gi")),
        k.V1Volume(name="cache", empty_dir=k.V1EmptyDirVolumeSource(size_limit=cache_limit)),
    ]
    mounts = [
        k.V1VolumeMount(name="config", mount_path=CONFIG_DIR, read_only=True),
        k.V1VolumeMount(name="tmp", mount_path="/tmp"),
        k.V1VolumeMount(name="cache", mount_path=CACHE_DIR),
    ]
    if shm:  # torch data loaders and NCCL use shared memory
        volumes.append(k.V1Volume(name="dshm", empty_dir=k.V1EmptyDirVolumeSource(medium="Memory", size_limit="2Gi")))
        mounts.append(k.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    store_path = _store_path(config)
    if store_path:
        claim = k.V1PersistentVolumeClaimVolumeSource(claim_name=config.k8s.store_claim)
        volumes.append(k.V1Volume(name="store", persistent_volume_claim=claim))
        mounts.append(k.V1VolumeMount(name="store", mount_path=store_path))
    if data and config.k8s.data_claim:
        mount = PurePosixPath(config.k8s.data_mount)
        if not mount.is_absolute() or not PurePosixPath(config.data.source).is_relative_to(mount):
            raise ConfigError(f"data.source {config.data.source!r}: must be a path under k8s.data_mount "
                              f"({config.k8s.data_mount}, where the k8s.data_claim volume is mounted)")
        claim = k.V1PersistentVolumeClaimVolumeSource(claim_name=config.k8s.data_claim, read_only=True)
        volumes.append(k.V1Volume(name="data", persistent_volume_claim=claim))
        mounts.append(k.V1VolumeMount(name="data", mount_path=str(mount), read_only=True))
    if config.k8s.model_cache_claim:  # the Hub cache on a PVC: the student is downloaded once, not per pod
        claim = k.V1PersistentVolumeClaimVolumeSource(claim_name=config.k8s.model_cache_claim)
        volumes.append(k.V1Volume(name="models", persistent_volume_claim=claim))
        mounts.append(k.V1VolumeMount(name="models", mount_path=HF_HOME))
    return volumes, mounts


def _container(config: RunConfig, stage: StagePlan) -> tuple[k.V1Container, list[k.V1Volume]]:
    res = stage_resources(config, stage)
    quantities = dict(res)
    gpus = stage.gpus
    if gpus:
        quantities[config.k8s.gpu_resource] = str(gpus)
    limits = dict(quantities)
    if config.k8s.cpu_limit:
        limits["cpu"] = config.k8s.cpu_limit
    volumes, mounts = _volumes(config, res, shm=stage.spec.shm, data=stage.spec.reads_data)
    secrets = ([config.k8s.s3_secret] if _is_s3(config) else []) + list(config.k8s.env_secrets)
    env_from = [k.V1EnvFromSource(secret_ref=k.V1SecretEnvSource(name=name)) for name in secrets] or None
    container = k.V1Container(
        name=stage.name,
        image=image(config, stage),
        image_pull_policy=config.k8s.image_pull_policy,
        args=[stage.name],
        env=_env(config, stage),
        env_from=env_from,
        resources=k.V1ResourceRequirements(requests=dict(quantities), limits=limits),
        volume_mounts=mounts,
        termination_message_policy="FallbackToLogsOnError",  # the last log lines say why it failed
        security_context=k.V1SecurityContext(
            allow_privilege_escalation=False, read_only_root_filesystem=True, run_as_non_root=True,
            capabilities=k.V1Capabilities(drop=["ALL"]), seccomp_profile=k.V1SeccompProfile(type="RuntimeDefault")),
    )
    return container, volumes


def _scheduling(config: RunConfig, stage: str, gpu: bool) -> dict[str, Any]:
    """nodeSelector, tolerations, affinity: k8s.scheduling.<stage> when set, else GPU stages select GPU nodes
    and tolerate their taint, and (cloud profile) CPU stages keep off nodes labelled as having GPUs."""
    kc = config.k8s
    if stage in kc.scheduling:
        own = kc.scheduling[stage]
        return {"node_selector": dict(own.node_selector) or None, "tolerations": list(own.tolerations) or None,
                "affinity": own.affinity}
    if gpu:
        return {"node_selector": dict(kc.gpu_node_selector) or None,
                "tolerations": [k.V1Toleration(key=GPU_TAINT, operator="Exists", effect="NoSchedule")]}
    if kc.profile == "cloud":
        term = k.V1NodeSelectorTerm(match_expressions=[
            k.V1NodeSelectorRequirement(key=GPU_NODE_LABEL, operator="NotIn", values=["true"])])
        return {"affinity": k.V1Affinity(node_affinity=k.V1NodeAffinity(
            required_during_scheduling_ignored_during_execution=k.V1NodeSelector(node_selector_terms=[term])))}
    return {}


def build_job(config: RunConfig, stage: StageSpec | str) -> k.V1Job:
    if not isinstance(stage, StageSpec):
        if stage not in STAGES:
            raise ConfigError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
        stage = spec(stage)
    refuse_url_credentials(config)
    kc = config.k8s
    plan = stage.plan(config)  # every per-config answer of the spec, once
    shards = plan.shards
    container, volumes = _container(config, plan)
    gpu = plan.gpus > 0
    pod = k.V1PodSpec(
        restart_policy="Never",
        containers=[container],
        volumes=volumes,
        service_account_name=kc.service_account,
        automount_service_account_token=False,
        enable_service_links=False,
        security_context=k.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=UID, run_as_group=UID, fs_group=UID,
            seccomp_profile=k.V1SeccompProfile(type="RuntimeDefault")),
        priority_class_name=kc.priority_class,
        image_pull_secrets=[k.V1LocalObjectReference(name=n) for n in kc.image_pull_secrets] or None,
        **_scheduling(config, stage.name, gpu),
    )
    failure_policy = k.V1PodFailurePolicy(rules=[
        k.V1PodFailurePolicyRule(action="FailJob", on_exit_codes=k.V1PodFailurePolicyOnExitCodesRequirement(
            container_name=stage.name, operator="In", values=[EXIT_CONFIG_ERROR])),
        k.V1PodFailurePolicyRule(action="Ignore", on_pod_conditions=[
            k.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")]),
    ])
    job_spec = k.V1JobSpec(
        suspend=True if kc.queue_name else None,  # Kueue resumes it once admitted (also without its webhook)
        backoff_limit=kc.backoff_limit,
        active_deadline_seconds=kc.active_deadline_s,
        ttl_seconds_after_finished=kc.ttl_after_finished_s,
        pod_failure_policy=failure_policy,
        pod_replacement_policy="Failed",  # a replacement starts only once the old pod is gone (no two writers)
        template=k.V1PodTemplateSpec(metadata=k.V1ObjectMeta(labels=labels(config, stage.name)), spec=pod),
    )
    if shards is not None:  # each shard retries on its own: one bad shard never kills the healthy ones
        job_spec.completion_mode, job_spec.completions, job_spec.parallelism = "Indexed", shards, shards
        job_spec.backoff_limit, job_spec.backoff_limit_per_index, job_spec.max_failed_indexes = None, kc.backoff_limit, shards
    return k.V1Job(
        api_version="batch/v1", kind="Job",
        metadata=k.V1ObjectMeta(name=job_name(config, stage.name), namespace=kc.namespace, labels=job_labels(config, stage.name),
                                annotations={"ielts-distill/version": __version__}),
        spec=job_spec)


DRIVER_ACCOUNT = "ielts-distill-driver"  # k8s/base/driver-rbac.yaml


def driver_job_name(config: RunConfig) -> str:
    return f"ielts-{config.run.id}-driver"


def build_driver_job(config: RunConfig, run_args: list[str]) -> k.V1Job:
    """``ielts-distill submit``: the driver itself as a Job (``ielts-distill run --executor k8s`` on the
    mounted run config, in-cluster credentials of the ielts-distill-driver account), so no laptop has to
    stay up. It runs the base image (every image holds the package) and may restart: it re-attaches."""
    kc = config.k8s
    refuse_url_credentials(config)
    quantities = {"cpu": "100m", "memory": "256Mi", "ephemeral-storage": "256Mi"}
    env = [k.V1EnvVar(name="HOME", value="/tmp"), k.V1EnvVar(name="PYTHONUNBUFFERED", value="1")]
    if kc.s3_endpoint:  # the driver reads the store (which stages are complete) like the Jobs do
        env.append(k.V1EnvVar(name="AWS_ENDPOINT_URL_S3", value=kc.s3_endpoint))
    volumes, mounts = _volumes(config, quantities, shm=False, data=False)  # config, /tmp, cache (+ store PVC)
    container = k.V1Container(
        name="driver",
        image=image_ref(config, "base"),
        image_pull_policy=kc.image_pull_policy,
        command=["ielts-distill", "run", "--executor", "k8s", "--config", CONFIG_FILE, *run_args],
        env=env,
        env_from=[k.V1EnvFromSource(secret_ref=k.V1SecretEnvSource(name=kc.s3_secret))] if _is_s3(config) else None,
        resources=k.V1ResourceRequirements(requests=dict(quantities), limits={**quantities, "cpu": "500m"}),
        volume_mounts=[m for m in mounts if m.name != "models"],
        termination_message_policy="FallbackToLogsOnError",
        security_context=k.V1SecurityContext(
            allow_privilege_escalation=False, read_only_root_filesystem=True, run_as_non_root=True,
            capabilities=k.V1Capabilities(drop=["ALL"]), seccomp_profile=k.V1SeccompProfile(type="RuntimeDefault")),
    )
    pod = k.V1PodSpec(
        restart_policy="Never", containers=[container], volumes=[v for v in volumes if v.name != "models"],
        service_account_name=DRIVER_ACCOUNT, automount_service_account_token=True, enable_service_links=False,
        priority_class_name=kc.priority_class,
        image_pull_secrets=[k.V1LocalObjectReference(name=n) for n in kc.image_pull_secrets] or None,
        security_context=k.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=UID, run_as_group=UID, fs_group=UID,
            seccomp_profile=k.V1SeccompProfile(type="RuntimeDefault")),
        **_scheduling(config, "driver", gpu=False))
    meta_labels = {**labels(config), "app.kubernetes.io/component": "driver"}
    return k.V1Job(
        api_version="batch/v1", kind="Job",
        metadata=k.V1ObjectMeta(name=driver_job_name(config), namespace=kc.namespace, labels=meta_labels,
                                annotations={"ielts-distill/version": __version__}),
        spec=k.V1JobSpec(backoff_limit=3, active_deadline_seconds=kc.wait_timeout_s,
                         ttl_seconds_after_finished=kc.ttl_after_finished_s, pod_replacement_policy="Failed",
                         pod_failure_policy=k.V1PodFailurePolicy(rules=[  # a failed stage stays final;
                             k.V1PodFailurePolicyRule(   # an API outage: a new pod re-attaches, uncounted
                                 action="FailJob", on_exit_codes=k.V1PodFailurePolicyOnExitCodesRequirement(
                                     container_name="driver", operator="In", values=[1, EXIT_CONFIG_ERROR])),
                             k.V1PodFailurePolicyRule(
                                 action="Ignore", on_exit_codes=k.V1PodFailurePolicyOnExitCodesRequirement(
                                     container_name="driver", operator="In", values=[EXIT_API_OUTAGE]))]),
                         template=k.V1PodTemplateSpec(metadata=k.V1ObjectMeta(labels=meta_labels), spec=pod)))


def build_run(config: RunConfig, stages: list[str] | tuple[str, ...] = STAGES) -> list[Any]:
    """The ConfigMap, then one Job per stage, in pipeline order."""
    return [build_configmap(config), *(build_job(config, s) for s in SPECS if s.name in stages)]


def to_dict(obj: Any) -> dict[str, Any]:
    """A client model as the plain camelCase dict the API server (and kubectl) expects."""
    return k.ApiClient().sanitize_for_serialization(obj)


def write_manifests(config: RunConfig, out_dir: str | Path) -> list[Path]:
    """One YAML file per object plus a kustomization.yaml listing them (``kubectl apply -k DIR``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for n, obj in enumerate(build_run(config)):
        stage = obj.metadata.labels.get("ielts-distill/stage", "config")
        path = out / f"{n:02d}-{obj.kind.lower()}-{stage}.yaml"
        path.write_text(yaml.safe_dump(to_dict(obj), sort_keys=False), encoding="utf-8")
        written.append(path)
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": [p.name for p in written]}
    note = ("# For review (kubectl diff -k / kustomize build). Applying it starts every stage's Job at once; run the\n"
            "# pipeline with `ielts-distill run --executor k8s`, `ielts-distill submit` or `render --format argo`.\n")
    (out / "kustomization.yaml").write_text(note + yaml.safe_dump(kustomization, sort_keys=False), encoding="utf-8")
    return written
