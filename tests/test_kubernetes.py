"""The DaemonSet and its kustomize base, validated by real tools: kustomize
(`kubectl kustomize`, offline) builds it and kubernetes-validate checks
every resource against the Kubernetes OpenAPI schemas (strict: unknown
fields fail). The ConfigMap reload itself (the kubelet's ..data swap) is
tested live in test_service_live.py."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from episode_tracer import config

K8S = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
KUBECTL = shutil.which("kubectl")
VALIDATE = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*VALIDATE, str(path)], capture_output=True, text=True)


def built(tmp_path: Path) -> Path:
    if KUBECTL is None:
        pytest.skip("kubectl not installed (apt: kubernetes-client)")
    r = subprocess.run([KUBECTL, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "all.yaml"
    out.write_text(r.stdout)
    return out


@pytest.mark.parametrize("name", ["daemonset.yaml", "namespace.yaml"])
def test_manifests_validate(name):
    r = validate(K8S / name)
    assert r.returncode == 0, r.stdout + r.stderr


def test_kustomize_build_validates(tmp_path):
    out = built(tmp_path)
    r = validate(out)
    assert r.returncode == 0, r.stdout + r.stderr
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.read_text())}
    assert set(docs) == {("Namespace", "agent-tracer"), ("DaemonSet", "agent-tracer"),
                         ("ConfigMap", "agent-tracer-config"), ("ConfigMap", "agent-tracer-policies")}
    # the ConfigMap's config is a valid tracer config (same loader as the node)
    cm = tmp_path / "etc" / "config.toml"
    cm.parent.mkdir()
    cm.write_text(docs[("ConfigMap", "agent-tracer-config")]["data"]["config.toml"])
    cfg = config.load(cm)
    assert cfg["metrics_listen"] == "0.0.0.0:9464" and cfg["site_policy_dir"] == "/opt/agent-tracer/policies.d"


def test_validator_rejects_a_broken_daemonset(tmp_path):
    """The validation can fail: an unknown field and a wrong type."""
    bad = tmp_path / "bad.yaml"
    bad.write_text((K8S / "daemonset.yaml").read_text().replace("hostPID: true", "hostPid: true"))
    r = validate(bad)
    assert r.returncode != 0 and "hostPid" in r.stdout + r.stderr
    bad.write_text((K8S / "daemonset.yaml").read_text().replace("containerPort: 9464", "containerPort: metrics"))
    assert validate(bad).returncode != 0


def test_daemonset_has_what_the_tracer_needs():
    ds = yaml.safe_load((K8S / "daemonset.yaml").read_text())
    spec = ds["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert spec["hostPID"] is True and spec["hostNetwork"] is True
    assert c["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    host = {m: vols[x["name"]].get("hostPath", {}).get("path") for m, x in mounts.items()}
    assert host["/sys/fs/cgroup"] == "/sys/fs/cgroup"
    assert host["/sys/kernel/tracing"] == "/sys/kernel/tracing"
    assert host["/host/lib/modules"] == "/lib/modules" and host["/usr/src"] == "/usr/src"
    assert host["/run/agent-tracer"] == "/run/agent-tracer" and host["/var/log/agent-tracer"] == "/var/log/agent-tracer"
    assert vols[mounts["/etc/agent-tracer"]["name"]]["configMap"]["name"] == "agent-tracer-config"
    assert vols[mounts["/opt/agent-tracer/policies.d"]["name"]]["configMap"]["name"] == "agent-tracer-policies"
    assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    # the entry point links a header tree bcc finds: the host's, else the image's generic one
    ep = (K8S.parent / "container" / "entrypoint.sh").read_text()
    assert "/host/lib/modules/$KREL/build" in ep and "/opt/agent-tracer/headers" in ep
    r = subprocess.run(["sh", "-n", str(K8S.parent / "container" / "entrypoint.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
