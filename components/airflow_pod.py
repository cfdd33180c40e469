"""The cluster mode's operator: a KubernetesPodOperator running the entry point in the project's image.

Imported only in cluster mode (the Kubernetes client takes seconds to import; the embedded DAGs never
need it). The pod runs ``python -m components.task ...`` with the step's resources (requests = limits,
GPUs as ``nvidia.com/gpu``), as a non-root user, with the S3 credentials from a Secret; the run's
identity and parameters are all it is given, the step's command line is resolved in the pod.
"""

from __future__ import annotations

import os

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import Asset, AssetAlias
from airflow.sdk.exceptions import AirflowException, AirflowSkipException
from kubernetes.client import models as k8s

from components.airflow_tasks import EupeTask, Settings, raise_for_exit
from components.graph import Pipeline, Resources, Step
from components.task import SKIPPED

ENTRY = ("python", "-m", "components.task")  # on the image's PATH, in its working directory
XCOM_FILE = "/airflow/xcom/return.json"  # what the pod operator's XCom sidecar reads back


class EupePodOperator(EupeTask, KubernetesPodOperator):
    """Cluster mode: the entry point in the project's image, resolved in the pod."""

    def __init__(self, *, pipeline: Pipeline, step: str | None = None, action: str = "run",
                 artifact_root: str, item: dict | None = None,
                 dataset: tuple[Asset, AssetAlias] | None = None, **kwargs):
        super().__init__(**{"do_xcom_push": action == "plan" or dataset is not None, **kwargs})
        self._setup(pipeline, step, action, artifact_root, item, dataset)

    def execute(self, context):
        self.skip_unneeded(context)  # before any pod is created
        return self.finished(context, super().execute(context))

    def build_pod_request_obj(self, context=None):
        if context is not None:  # only the run's identity and parameters travel; the pod resolves the rest
            self.arguments = self.entry_args(context, XCOM_FILE if self.do_xcom_push else None)
        return super().build_pod_request_obj(context)

    def cleanup(self, pod, remote_pod):
        """A failed pod: exit 2 or 3 of the step fails the task at once, anything else is retried."""
        try:
            return super().cleanup(pod, remote_pod)
        except AirflowSkipException:
            raise
        except AirflowException as e:
            code = container_exit_code(remote_pod, self.base_container_name)
            if code in (2, 3):
                raise_for_exit(self.label, code, str(e).splitlines())
            raise


def container_exit_code(remote_pod, container: str) -> int | None:
    statuses = (remote_pod.status.container_statuses if remote_pod and remote_pod.status else None) or []
    status = next((s for s in statuses if s.name == container), None)
    terminated = status.state.terminated if status and status.state else None
    return terminated.exit_code if terminated else None


def resources(r: Resources) -> dict[str, str]:
    """Requests = limits of a step's container; GPUs as ``nvidia.com/gpu``."""
    return {"cpu": r.cpu, "memory": r.memory, **({"nvidia.com/gpu": str(r.gpus)} if r.gpus else {})}


SCRATCH_ENV = {"HOME": "/tmp/home", "EUPE_CACHE": "/home/eupe/.cache/eupe", "MPLCONFIGDIR": "/tmp/matplotlib"}


def scratch_volumes(gpu: bool) -> list:
    """The writable places of a pod whose root filesystem is read-only: /tmp, the S3/hub cache (EUPE_CACHE, as
    the chart mounts it) and, for GPU steps, a /dev/shm in memory for the data loader's workers."""
    volumes = [k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource()),
               k8s.V1Volume(name="cache", empty_dir=k8s.V1EmptyDirVolumeSource())]
    if gpu:
        volumes.append(k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory")))
    return volumes


def scratch_mounts(gpu: bool) -> list:
    mounts = [k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
              k8s.V1VolumeMount(name="cache", mount_path=SCRATCH_ENV["EUPE_CACHE"])]
    return mounts + ([k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")] if gpu else [])


def pod_kwargs(step: Step | None, s: Settings) -> dict:
    """What a pod of ``step`` (or of a planner / the summary: ``None``) runs as: image, command, resources,
    non-root on a read-only root filesystem with scratch volumes, S3 credentials from a Secret."""
    r = step.resources if step else Resources(cpu="1", memory="2Gi")
    gpu = r.gpus > 0
    return dict(
        image=(s.gpu_image or s.image) if gpu else s.image, cmds=list(ENTRY), namespace=s.namespace,
        container_resources=k8s.V1ResourceRequirements(requests=resources(r), limits=resources(r)),
        security_context=k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=1000, run_as_group=1000,
                                                  fs_group=1000),
        container_security_context=k8s.V1SecurityContext(
            run_as_non_root=True, allow_privilege_escalation=False, capabilities=k8s.V1Capabilities(drop=["ALL"]),
            read_only_root_filesystem=True, seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
        volumes=scratch_volumes(gpu), volume_mounts=scratch_mounts(gpu),
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=s.s3_secret))],
        env_vars=[k8s.V1EnvVar(name="PYTHONUNBUFFERED", value="1"),
                  *(k8s.V1EnvVar(name=k, value=v) for k, v in SCRATCH_ENV.items()),
                  *([k8s.V1EnvVar(name="EUPE_PUSHGATEWAY", value=gateway)] if (gateway := s.pushgateway or
                                                                               os.environ.get("EUPE_PUSHGATEWAY")) else [])],
        tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")] if gpu else None,
        labels={"app.kubernetes.io/name": "eupe", "eupe/step": (step.name if step else "control").replace("_", "-")},
        service_account_name=s.service_account or None, skip_on_exit_code=SKIPPED,
        termination_message_policy="FallbackToLogsOnError", on_finish_action="delete_succeeded_pod",
        get_logs=True,
    )
