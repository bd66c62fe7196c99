"""``ielts-distill render --format argo``: the run as an Argo Workflows ``Workflow``, so it runs without the
laptop. A DAG of one template per stage (dependencies = the StageSpecs' inputs), each template the very pod
spec of the stage's Job (pipeline.k8s.objects), sharded stages fanned out with ``withSequence`` (the index
goes in as JOB_COMPLETION_INDEX), retries per stage (k8s.backoff_limit; exit code 2, a deterministic
error, is never retried). The S3 store stays the only hand-off: no Argo artifacts, no parameters but the
shard index. Built with hera's Argo models; the output starts with the run's ConfigMap, which the pods mount.
"""

from __future__ import annotations

from typing import Any

import yaml
from hera.workflows import models as m

from pipeline.config import RunConfig
from pipeline.k8s.objects import EXIT_CONFIG_ERROR, QUEUE_LABEL, build_configmap, build_job, labels, to_dict
from pipeline.stages import SPECS, StageSpec

ENTRYPOINT = "pipeline"
INDEX = "index"


def workflow_name(config: RunConfig) -> str:
    return f"ielts-{config.run.id}"


def _template(config: RunConfig, spec: StageSpec) -> m.Template:
    job = to_dict(build_job(config, spec))
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    inputs = None
    if spec.shard_count(config) is not None:
        container["env"].append({"name": "JOB_COMPLETION_INDEX", "value": f"{{{{inputs.parameters.{INDEX}}}}}"})
        inputs = m.Inputs(parameters=[m.Parameter(name=INDEX)])
    retry = m.RetryStrategy(limit=str(config.k8s.backoff_limit), retry_policy="Always",
                            expression=f"asInt(lastRetry.exitCode) != {EXIT_CONFIG_ERROR}")
    return m.Template(
        name=spec.name, inputs=inputs, retry_strategy=retry,
        metadata=m.Metadata(labels=job["spec"]["template"]["metadata"]["labels"]),
        container=m.Container.model_validate(container),
        volumes=[m.Volume.model_validate(v) for v in pod["volumes"]],
        security_context=m.PodSecurityContext.model_validate(pod["securityContext"]),
        automount_service_account_token=False, service_account_name=pod.get("serviceAccountName"),
        node_selector=pod.get("nodeSelector"),
        tolerations=[m.Toleration.model_validate(t) for t in pod.get("tolerations") or []] or None,
        affinity=m.Affinity.model_validate(pod["affinity"]) if pod.get("affinity") else None,
        priority_class_name=pod.get("priorityClassName"),
        active_deadline_seconds=str(job["spec"]["activeDeadlineSeconds"]),
    )


def _task(config: RunConfig, spec: StageSpec) -> m.DAGTask:
    shards = spec.shard_count(config)
    return m.DAGTask(
        name=spec.name, template=spec.name, dependencies=list(spec.inputs) or None,
        with_sequence=m.Sequence(count=str(shards)) if shards is not None else None,
        arguments=m.Arguments(parameters=[m.Parameter(name=INDEX, value="{{item}}")]) if shards is not None else None)


def build_workflow(config: RunConfig) -> m.Workflow:
    kc = config.k8s
    meta_labels = labels(config)
    queue = {QUEUE_LABEL: kc.queue_name} if kc.queue_name else {}  # on the pods: Kueue ignores Workflows, its
    # pod integration admits each pod (docs/kubernetes.md, Kueue)
    dag = m.Template(name=ENTRYPOINT, dag=m.DAGTemplate(tasks=[_task(config, s) for s in SPECS]))
    return m.Workflow(
        api_version="argoproj.io/v1alpha1", kind="Workflow",
        metadata=m.ObjectMeta(name=workflow_name(config), namespace=kc.namespace, labels=meta_labels),
        spec=m.WorkflowSpec(
            entrypoint=ENTRYPOINT,
            pod_metadata=m.Metadata(labels=queue) if queue else None,
            templates=[dag, *(_template(config, s) for s in SPECS)],
            # the pods keep no service account token; Argo's executor reports results with this one
            executor=m.ExecutorConfig(service_account_name="ielts-distill-workflow"),
            image_pull_secrets=[m.LocalObjectReference(name=n) for n in kc.image_pull_secrets] or None,
            pod_gc=m.PodGC(strategy="OnWorkflowSuccess"),
            ttl_strategy=m.TTLStrategy(seconds_after_completion=kc.ttl_after_finished_s),
        ))


def workflow_dict(config: RunConfig) -> dict[str, Any]:
    return build_workflow(config).model_dump(by_alias=True, exclude_none=True, mode="json")


def workflow_yaml(config: RunConfig) -> str:
    """The ConfigMap, then the Workflow: ``kubectl create -f FILE`` (or ``argo submit`` the second)."""
    docs = [to_dict(build_configmap(config)), workflow_dict(config)]
    return yaml.safe_dump_all(docs, sort_keys=False)
