"""helm/eupe-pipeline rendered by a real Helm engine (helm-python-sdk), every manifest checked against the
Kubernetes schemas (kubernetes-validate, strict) or the CRD excerpts under tests/fixtures/crds/."""

from __future__ import annotations

import ast
import json
import runpy
import sys
import types
from pathlib import Path

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "eupe-pipeline"
ALL_ON = CHART / "ci" / "all-on-values.yaml"
EXAMPLES = ROOT / "helm" / "examples"
CRDS = ROOT / "tests" / "fixtures" / "crds"
K8S_VERSION = kubernetes_validate.latest_version()
CUSTOM = {("kubeflow.org/v1", "PyTorchJob"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
          ("monitoring.coreos.com/v1", "PrometheusRule")}


def render(values: dict | None = None) -> dict[str, str]:
    with helm_python.Chart.load(str(CHART)) as chart:
        return chart.render(values or {}, name="eupe", namespace="ml")


def documents(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def values_file(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def default_docs() -> list[dict]:
    return documents(render())


@pytest.fixture(scope="module")
def all_on_docs() -> list[dict]:
    return documents(render(values_file(ALL_ON)))


def find(docs: list[dict], kind: str, suffix: str = "") -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(hits) == 1, f"{kind} *{suffix}: {[d['metadata']['name'] for d in hits]}"
    return hits[0]


def pytorchjob(docs: list[dict]) -> dict:
    return yaml.safe_load(find(docs, "ConfigMap", "-pytorchjob")["data"]["pytorchjob.yaml"])


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    """Every pod spec: Deployments, Jobs and the PyTorchJob template's replicas."""
    specs = {}
    for d in docs:
        if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            specs[f"{d['kind']}/{d['metadata']['name']}"] = d["spec"]["template"]["spec"]
        if d["kind"] == "ConfigMap" and "pytorchjob.yaml" in d.get("data", {}):
            for role, replica in pytorchjob([d])["spec"]["pytorchReplicaSpecs"].items():
                specs[f"PyTorchJob/{role}"] = replica["template"]["spec"]
    return specs


def crd_schema(kind: str) -> dict:
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no CRD fixture for {kind}")


# --------------------------------------------------------------------------- lint and Kubernetes schemas


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "all-on"])
def test_lint_is_clean(values):
    report = helm_python.lint(str(CHART), values_file(values) if values else None, strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] > 1] == []  # INFO ("icon is recommended") only


def test_every_core_manifest_validates(default_docs, all_on_docs):
    for doc in default_docs + all_on_docs:
        if (doc["apiVersion"], doc["kind"]) not in CUSTOM:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = {d["kind"] for d in all_on_docs}
    assert {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job", "Deployment", "Service", "NetworkPolicy",
            "ServiceMonitor", "PrometheusRule"} <= kinds


def test_pytorchjob_pods_validate_as_pods(all_on_docs):
    for name, spec in pod_specs(all_on_docs).items():
        if name.startswith("PyTorchJob/"):
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "train"}, "spec": spec}
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_custom_resources_match_their_crds(all_on_docs):
    customs = [d for d in all_on_docs if (d["apiVersion"], d["kind"]) in CUSTOM] + [pytorchjob(all_on_docs)]
    assert sorted(d["kind"] for d in customs) == ["PrometheusRule", "PyTorchJob", "ServiceMonitor"]
    for doc in customs:
        jsonschema.validate(doc, crd_schema(doc["kind"]))
    with pytest.raises(jsonschema.ValidationError):  # the fixtures do refuse: a PyTorchJob without replicas
        jsonschema.validate({"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "spec": {}}, crd_schema("PyTorchJob"))


def test_defaults_render_only_the_core(default_docs):
    assert sorted(d["kind"] for d in default_docs) == ["ConfigMap", "Role", "RoleBinding", "ServiceAccount"]
    off = render({**values_file(ALL_ON), "monitoring": {**values_file(ALL_ON)["monitoring"], "prometheusOperator": False}})
    assert not {"ServiceMonitor", "PrometheusRule"} & {d["kind"] for d in documents(off)}


# --------------------------------------------------------------------------- security


def test_every_pod_is_locked_down(all_on_docs):
    specs = pod_specs(all_on_docs)
    assert set(specs) == {"Deployment/eupe-pushgateway", "Job/eupe-kfp-upload", "PyTorchJob/Master", "PyTorchJob/Worker"}
    for name, spec in specs.items():
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 1000 and psc["runAsGroup"] == 1000, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and sc["runAsNonRoot"] is True, (name, c["name"])
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(requests), (name, c["name"])
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], (name, c["name"])
            if c["name"] != "pushgateway":  # the project's image: the cache folder is scratch too
                env = {e["name"]: e.get("value") for e in c["env"]}
                assert "emptyDir" in volumes[mounts[env["EUPE_CACHE"]]], (name, c["name"])


def test_rbac_is_namespaced_and_minimal(default_docs, all_on_docs):
    assert not [d for d in all_on_docs if d["kind"].startswith("Cluster")]
    rules = {r: set(rule["verbs"]) for rule in find(default_docs, "Role")["rules"] for r in rule["resources"]}
    assert set(rules) == {"pods", "pods/log", "pods/exec", "events"}
    assert rules["pods/log"] == {"get", "list"} and rules["events"] == {"get", "list", "watch"}
    on = {r for rule in find(all_on_docs, "Role")["rules"] for r in rule["resources"]}
    assert {"pytorchjobs", "pytorchjobs/status"} <= on
    subjects = find(all_on_docs, "RoleBinding")["subjects"]
    assert {"kind": "ServiceAccount", "name": "airflow-worker", "namespace": "airflow"} in subjects


def test_network_policy_allows_dns_object_store_api_server_only(all_on_docs):
    policy = find(all_on_docs, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Egress"] and policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "eupe"}
    rules = policy["egress"]
    assert {p["port"] for p in rules[0]["ports"]} == {53}
    blocks = {b["ipBlock"]["cidr"]: {p["port"] for p in r["ports"]} for r in rules for b in r["to"] if "ipBlock" in b}
    assert blocks == {"10.20.0.0/16": {443, 9000}, "10.0.0.1/32": {443, 6443}}
    assert all("to" in r for r in rules)  # no rule open to everywhere


# --------------------------------------------------------------------------- values and their schema


@pytest.mark.parametrize("values, field", [
    ({"training": {"nodes": -1}}, "/training/nodes"),
    ({"settings": {"retryDelaySeconds": -5}}, "/settings/retryDelaySeconds"),
    ({"image": {"repository": None}}, "repository"),
    ({"image": {"tag": ""}}, "/image/tag"),
    ({"settings": {"mode": "hybrid"}}, "/settings/mode"),
    ({"objectStore": {"accessKey": "AKIA..."}}, "accessKey"),  # never a secret value in values
    ({"kfpUpload": {"enabled": True}}, "/kfpUpload/host"),
], ids=["negative-nodes", "negative-delay", "missing-image", "empty-tag", "unknown-mode", "secret-in-values", "kfp-host"])
def test_schema_refuses_wrong_values(values, field):
    with pytest.raises(helm_python.HelmValuesError) as e:
        render(values)
    assert field in str(e.value)


def test_local_artifact_root_needs_a_checkpoint_volume():
    with pytest.raises(helm_python.HelmRenderError, match="training.checkpoints.existingClaim"):
        render({"training": {"enabled": True}, "settings": {"artifactRoot": "/data/eupe"}})


def test_image_default_is_components_images():
    sys.path.insert(0, str(ROOT))
    from components import images

    v = values_file(CHART / "values.yaml")["image"]
    assert f"{v['repository']}:{v['tag']}" == images.DEFAULT_IMAGE


def settings_fields() -> list[str]:
    """components/airflow_tasks.py Settings' fields, read from its source (importing it imports Airflow)."""
    tree = ast.parse((ROOT / "components" / "airflow_tasks.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    return [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)]


def test_settings_configmap_is_the_airflow_variables(all_on_docs):
    data = find(all_on_docs, "ConfigMap", "-settings")["data"]
    fields = settings_fields()
    embedded_only = {"workdir", "python"}
    assert {f"AIRFLOW_VAR_EUPE_{f.upper()}" for f in fields if f not in embedded_only} <= set(data)
    variables = {k for k in data if k.startswith("AIRFLOW_VAR_")}
    assert variables == {f"AIRFLOW_VAR_EUPE_{f.upper()}" for f in fields if f not in embedded_only}  # no stray key
    assert data["AIRFLOW_VAR_EUPE_MODE"] == "cluster" and data["AIRFLOW_VAR_EUPE_S3_SECRET"] == "eupe-s3"
    assert data["AIRFLOW_VAR_EUPE_IMAGE"] == data["EUPE_IMAGE"] == "registry.example.com/ml/eupe:0.1.0"
    assert data["EUPE_GPU_IMAGE"] == "registry.example.com/ml/eupe-cuda:0.1.0"
    assert data["AIRFLOW_VAR_EUPE_SERVICE_ACCOUNT"] == "eupe" and data["AIRFLOW_VAR_EUPE_NAMESPACE"] == "ml"
    assert data["EUPE_PUSHGATEWAY"] == "eupe-pushgateway.ml.svc:9091"
    assert float(data["AIRFLOW_VAR_EUPE_RETRY_DELAY_S"]) == 120.0  # Settings.load: type(default)(raw)
    assert int(data["AIRFLOW_VAR_EUPE_TRAIN_NODES"]) == 4 and int(data["AIRFLOW_VAR_EUPE_TRAIN_NODES_STAGE1"]) == 0
    assert data["AIRFLOW_VAR_EUPE_PYTORCHJOB_TEMPLATE"] == "/opt/eupe/pytorchjob/pytorchjob.yaml"
    params = json.loads(data["AIRFLOW_VAR_EUPE_PARAMS"])
    assert params["eupe_retrain"] == {"model_name": "vit_b_prod", "latency_budget_ms": 216, "device_classes": "iphone-15-pro-cpu"}


def test_without_training_every_step_is_one_pod(default_docs):
    data = find(default_docs, "ConfigMap", "-settings")["data"]
    assert data["AIRFLOW_VAR_EUPE_TRAIN_NODES"] == "1"


# --------------------------------------------------------------------------- the parts


def test_pytorchjob_template_contract(all_on_docs):
    job = pytorchjob(all_on_docs)
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert job["spec"]["nprocPerNode"] == "8"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3  # training.nodes - 1
    # a lost worker restarts the worker group, which resumes (test_elastic.py runs the same torchrun locally)
    assert job["spec"]["elasticPolicy"] == {"rdzvBackend": "c10d", "rdzvPort": 23456, "minReplicas": 4,
                                            "maxReplicas": 4, "maxRestarts": 3}
    for role, r in replicas.items():
        assert r["restartPolicy"] == "ExitCode", role  # never restart bad input (exit 2) in place
        spec = r["template"]["spec"]
        (c,) = spec["containers"]
        assert c["name"] == "pytorch" and c["image"] == "registry.example.com/ml/eupe-cuda:0.1.0"
        assert c["command"] == ["torchrun"] and c["args"] == ["-m", "components.task"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "8"
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert {"secretRef": {"name": "eupe-s3"}} in c["envFrom"]
        claim = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert claim[0]["persistentVolumeClaim"]["claimName"] == "eupe-checkpoints"
        assert {"name": claim[0]["name"], "mountPath": "/checkpoints"} in c["volumeMounts"]


def test_pytorchjob_without_a_volume_on_s3():
    docs = documents(render({"training": {"enabled": True, "nodes": 1, "gpusPerNode": 0, "nprocPerNode": "cpu"}}))
    job = pytorchjob(docs)
    assert job["spec"]["nprocPerNode"] == "cpu" and job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 0
    spec = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert not [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert "nvidia.com/gpu" not in spec["containers"][0]["resources"]["limits"]
    assert spec["containers"][0]["image"] == "eupe:latest"


def test_alerts_use_the_exported_metrics(all_on_docs):
    sys.path.insert(0, str(ROOT / "src"))
    from eupe import metrics

    rules = {r["alert"]: r for r in find(all_on_docs, "PrometheusRule")["spec"]["groups"][0]["rules"]}
    assert set(rules) == {"EupeRetrainingFailed", "EupeLatencyGateFailed", "EupeNoSuccessfulRetraining"}
    assert "eupe_step_success" in metrics.STEP_METRICS and 'pipeline="eupe_retrain"' in rules["EupeRetrainingFailed"]["expr"]
    assert ("passed", "latency") == metrics.GATES["latency"] and 'gate="latency"' in rules["EupeLatencyGateFailed"]["expr"]
    stale = rules["EupeNoSuccessfulRetraining"]["expr"]
    assert "eupe_step_last_success_timestamp_seconds" in metrics.STEP_METRICS and 'step="promote"' in stale
    assert stale.split()[-1] == str(8 * 86400)
    for r in rules.values():
        assert f'job="{metrics.JOB}"' in r["expr"]
    monitor = find(all_on_docs, "ServiceMonitor")["spec"]
    assert monitor["endpoints"][0]["honorLabels"] is True  # the pushed job/pipeline/run/step labels survive


def test_dashboard_copy_is_the_repository_dashboard(all_on_docs):
    copy = (CHART / "dashboards" / "eupe-grafana.json").read_bytes()
    assert copy == (ROOT / "dashboards" / "eupe-grafana.json").read_bytes()
    cm = find(all_on_docs, "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["eupe-grafana.json"]) == json.loads(copy)


class FakeClient:
    """kfp.Client as the upload script uses it: pipelines by name, versions by (pipeline, name)."""

    def __init__(self, host, known=(), versions=()):
        self.host, self.known, self.versions, self.calls = host, dict(known), set(versions), []

    def get_pipeline_id(self, name):
        return self.known.get(name)

    def upload_pipeline(self, path, pipeline_name=None, namespace=None, description=None):
        self.calls.append(("pipeline", pipeline_name, namespace, Path(path).name))

    def upload_pipeline_version(self, path, pipeline_version_name, pipeline_id=None):
        if (pipeline_id, pipeline_version_name) in self.versions:
            err = RuntimeError("(409) Conflict: already exists")
            err.status = 409
            raise err
        self.calls.append(("version", pipeline_id, pipeline_version_name, Path(path).name))


def test_kfp_upload_job_and_its_script(all_on_docs, tmp_path, monkeypatch):
    job = find(all_on_docs, "Job", "-kfp-upload")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "registry.example.com/ml/eupe:0.1.0"
    assert c["args"][0].startswith("python -m components.kfp_pipeline --out /tmp/build && python /opt/eupe/kfp-upload/")
    env = {e["name"]: e.get("value") for e in c["env"]}
    script = tmp_path / "kfp_upload.py"
    script.write_text(find(all_on_docs, "ConfigMap", "-kfp-upload")["data"]["kfp_upload.py"])
    build = tmp_path / "build"
    build.mkdir()
    for name in ("eupe_retrain", "eupe_domain_finetune"):
        (build / f"{name}.yaml").write_text("{}")
    for key in ("KFP_HOST", "KFP_NAMESPACE", "EUPE_PIPELINE_PREFIX", "EUPE_PIPELINE_VERSION"):
        monkeypatch.setenv(key, env[key])
    clients = []

    def client(host):
        clients.append(FakeClient(host, known={"vision-eupe_retrain": "p1"}, versions={("p1", "kept")}))
        return clients[-1]

    monkeypatch.setitem(sys.modules, "kfp", types.SimpleNamespace(Client=client))
    monkeypatch.setattr(sys, "argv", [str(script), str(build)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(script), run_name="__main__")
    assert e.value.code == 0
    assert clients[0].host == "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
    assert clients[0].calls == [("pipeline", "vision-eupe_domain_finetune", "team-vision", "eupe_domain_finetune.yaml"),
                                ("version", "p1", env["EUPE_PIPELINE_VERSION"], "eupe_retrain.yaml")]
    monkeypatch.setenv("EUPE_PIPELINE_VERSION", "kept")  # the hook run again for one release: kept, exit 0
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(script), run_name="__main__")
    assert e.value.code == 0  # only the pipeline the fake does not know is uploaded again
    assert clients[1].calls == [("pipeline", "vision-eupe_domain_finetune", "team-vision", "eupe_domain_finetune.yaml")]


def test_example_values_render():
    cluster = values_file(EXAMPLES / "cluster-values.yaml")
    docs = documents(render(cluster))
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) not in CUSTOM:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    airflow = values_file(EXAMPLES / "airflow-values.yaml")
    env_from = yaml.safe_load(airflow["extraEnvFrom"])
    assert {"configMapRef": {"name": "eupe-settings"}} in env_from
    assert airflow["dags"]["gitSync"]["enabled"] is True and airflow["dags"]["gitSync"]["subPath"] == "dags"
    mounts = {m["mountPath"]: m["name"] for m in airflow["workers"]["extraVolumeMounts"]}
    volume = {v["name"]: v for v in airflow["workers"]["extraVolumes"]}[mounts["/opt/eupe/pytorchjob"]]
    assert volume["configMap"]["name"] == find(docs, "ConfigMap", "-pytorchjob")["metadata"]["name"]


def test_the_chart_s_parameter_defaults_become_the_dags_form_defaults(all_on_docs, monkeypatch):
    """AIRFLOW_VAR_EUPE_PARAMS of the settings ConfigMap, read by the DAGs: the forms' defaults follow it, and a
    parameter a DAG does not have is refused when the DAG is built."""
    from components.airflow_dag import build_dag
    from components.airflow_params import finetune_form
    from components.airflow_tasks import Settings
    from components.graph import FINETUNE, RETRAIN

    data = find(all_on_docs, "ConfigMap", "-settings")["data"]
    s = Settings(params=data["AIRFLOW_VAR_EUPE_PARAMS"])
    retrain = build_dag(RETRAIN, settings=s, schedule=None)
    assert retrain.params["model_name"] == "vit_b_prod" and retrain.params["latency_budget_ms"] == "216"
    finetune = build_dag(FINETUNE, params=finetune_form(FINETUNE), settings=s, schedule=None)
    assert finetune.params["model_name"] == "vit_b_domain" and finetune.params["latency_budget_ms"] == 250.0
    assert finetune.params["device_class"] == "iphone-15-pro-cpu"
    with pytest.raises(ValueError, match="eupe_params: eupe_retrain has no parameter 'student'"):
        build_dag(RETRAIN, settings=Settings(params='{"eupe_retrain": {"student": "vit_s"}}'), schedule=None)
