"""Container episode sources without the kernel: the [containers] config
(strict, errors naming file and key), cgroup path rules and the built-in
runtime shapes, the kubelet's pod cgroup paths (recorded examples of both
drivers), and label resolution from real state files and a docker-style
API served on a unix socket."""
from __future__ import annotations

import json
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from episode_tracer import config
from episode_tracer.sources import (ContainerSource, ContainersConfig, Resolver, match_path, parse_config,
                            parse_kube_path)

CID = "3f9c2d1e0b7a4c5d6e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9012a3b4c5d"
UID = "8e1d1b5c-6a8e-4e43-9b2e-0d5f3c1a7b21"

# recorded from kubelets (systemd and cgroupfs drivers), containerd / CRI-O / docker
KUBE_PATHS = [
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/"
     f"cri-containerd-{CID}.scope", "burstable", CID),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice/"
     f"crio-{CID}.scope", "besteffort", CID),
    (f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/docker-{CID}.scope", "guaranteed", CID),
    (f"/kubepods/burstable/pod{UID}/{CID}", "burstable", CID),
    (f"/kubepods/pod{UID}/{CID}", "guaranteed", CID),
    (f"/kubepods/besteffort/pod{UID}", "besteffort", None),  # the pod's own cgroup
]


@pytest.mark.parametrize("path,qos,cid", KUBE_PATHS)
def test_kubelet_pod_paths(path, qos, cid):
    assert parse_kube_path(path) == {"uid": UID, "qos": qos, "container_id": cid}


@pytest.mark.parametrize("path", ["/machine.slice/libpod-" + CID + ".scope", "/system.slice/ssh.service",
                                  "/kubepods.slice", "/agent-tracer/ep-1"])
def test_not_pod_paths(path):
    assert parse_kube_path(path) is None


def test_rules_first_match_wins_then_builtin_shapes():
    cfg = parse_config({"rules": [
        {"pattern": r"^/sandbox/(?P<episode>[^/]+)$"},
        {"pattern": r"^/sandbox/(?P<container>[^/]+)$", "label": "never"},  # shadowed by rules[0]
        {"pattern": r"^/ray/(?P<container>[a-z0-9]+)$", "label": "rollout"},
    ]})
    m = match_path(cfg, "/sandbox/r-17")
    assert (m.episode, m.container_id, m.rule, m.top) == ("r-17", None, "rules[0]", True)
    assert match_path(cfg, "/sandbox/r-17/sub") is None
    # an unanchored rule matches below the container too: not a new episode there (its root's cgroup)
    m = match_path(parse_config({"rules": [{"pattern": r"^/sb/(?P<episode>[^/]+)"}]}), "/sb/r-1/sub")
    assert m.episode == "r-1" and m.top is False
    m = match_path(cfg, "/ray/abc123")
    assert (m.episode, m.container_id, m.label, m.rule) == (None, "abc123", "rollout", "rules[2]")
    for path, name in [(f"/machine.slice/libpod-{CID}.scope", "podman"), (f"/libpod_parent/libpod-{CID}", "podman"),
                       (f"/system.slice/docker-{CID}.scope", "docker"), (f"/docker/{CID}", "docker"),
                       (f"/system.slice/cri-containerd-{CID}.scope", "containerd")]:
        m = match_path(cfg, path)
        assert m is not None and (m.container_id, m.rule, m.label, m.top) == (CID, name, "agent-tracer.episode", True)
    m = match_path(cfg, KUBE_PATHS[0][0])
    assert m.container_id == CID and m.pod == {"uid": UID, "qos": "burstable"}
    assert match_path(cfg, "/system.slice/cron.service") is None
    assert match_path(parse_config({"builtin_patterns": False}), f"/docker/{CID}") is None


@pytest.mark.parametrize("table,error", [
    ({"lable": "x"}, "lable: unknown key"),
    ({"rules": [{"pattern": "(?P<episode>"}]}, "rules[0].pattern: not a valid regular expression"),
    ({"rules": [{"pattern": "^/x/(.*)$"}]}, "rules[0].pattern: needs a named group"),
    ({"rules": [{"pattern": "^/x/(?P<episode>.*)$", "episodes": 1}]}, "rules[0].episodes: unknown key"),
    ({"rules": [{}]}, "rules[0].pattern: required"),
    ({"state_dirs": ["/run/crun/status"]}, "state_dirs: every entry must contain {id}"),
    ({"runtime_sockets": ["run/docker.sock"]}, "runtime_sockets: expected a list of absolute paths"),
    ({"label": ""}, "label: expected a non-empty string"),
])
def test_config_errors(table, error):
    with pytest.raises(ValueError) as e:
        parse_config(table)
    assert error in str(e.value)


def test_config_file_error_names_file_and_key(tmp_path):
    f = tmp_path / "config.toml"
    f.write_text('[containers]\nlabel = "agent-tracer.episode"\n[[containers.rules]]\npattern = "^/x/(.*)$"\n')
    with pytest.raises(config.ConfigError) as e:
        config.load(f)
    assert f"{f}: containers: rules[0].pattern: needs a named group" in str(e.value)
    f.write_text('[containers]\nlabel = "rollout.id"\n[[containers.rules]]\npattern = "^/sb/(?P<episode>[^/]+)$"\n')
    cfg = config.load(f)
    opts = config.run_options(cfg)
    assert parse_config(opts.containers).label == "rollout.id"


def _state(tmp: Path, cid: str, annotations: dict[str, str], kind: str = "crun") -> ContainersConfig:
    bundle = tmp / f"bundle-{cid}"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "annotations": annotations}))
    d = tmp / kind / cid
    d.mkdir(parents=True)
    if kind == "crun":
        (d / "status").write_text(json.dumps({"pid": 1, "bundle": str(bundle), "rootfs": "/"}))
    else:  # runc
        (d / "state.json").write_text(json.dumps({"config": {"labels": [f"bundle={bundle}"]}}))
    return ContainersConfig(runtime_sockets=[], state_dirs=[str(tmp / "crun/{id}/status"),
                                                           str(tmp / "runc/{id}/state.json")])


@pytest.mark.parametrize("kind", ["crun", "runc"])
def test_labels_from_the_oci_bundle(tmp_path, kind):
    ann = {"agent-tracer.episode": "r-9", "io.kubernetes.cri.sandbox-namespace": "rl",
           "io.kubernetes.cri.sandbox-name": "rollout-9", "io.kubernetes.cri.container-name": "agent",
           "io.kubernetes.cri.image-name": "reg/agent:3"}
    cfg = _state(tmp_path, CID, ann, kind)
    info = Resolver(cfg).resolve(CID)
    assert info.labels["agent-tracer.episode"] == "r-9"
    assert info.record() == {"id": CID, "name": "agent", "image": "reg/agent:3"}
    assert info.pod == {"namespace": "rl", "name": "rollout-9"}
    assert info.runtime.startswith("oci:")


def test_pending_until_the_runtime_writes_its_state_then_decided(tmp_path, monkeypatch):
    cfg = ContainersConfig(runtime_sockets=[], state_dirs=[str(tmp_path / "crun/{id}/status")])
    src = ContainerSource(cfg)
    path = f"/machine.slice/libpod-{CID}.scope"
    cg_dir = tmp_path / "cg" / path.strip("/")
    cg_dir.mkdir(parents=True)
    monkeypatch.setattr("episode_tracer.sources._abs", lambda p: str(tmp_path / "cg" / p.strip("/")))
    assert src.classify(7, path, 0.0) is None and 7 in src.pending  # the cgroup first, its state after
    _state(tmp_path, CID, {"agent-tracer.episode": "r-1"})
    [(cg, got_path, d)] = src.retry(0.1)
    assert (cg, got_path, d.episode, d.container["id"], d.rule) == (7, path, "r-1", CID, "podman")
    assert not src.pending


def test_unlabelled_bad_label_and_unresolved_are_not_episodes(tmp_path, monkeypatch):
    a, b = "a" * 64, "b" * 64
    cfg = _state(tmp_path, a, {"other": "x"})
    _state(tmp_path, b, {"agent-tracer.episode": "bad id with spaces"})
    src = ContainerSource(cfg)
    assert src.classify(1, f"/docker/{a}", 0.0) is None and src.unlabelled == 1
    assert src.classify(2, f"/docker/{b}", 0.0) is None and src.bad_label == 1
    monkeypatch.setattr("episode_tracer.sources._abs", lambda p: str(tmp_path))  # the cgroup still exists
    assert src.classify(3, f"/docker/{'c' * 64}", 0.0) is None and 3 in src.pending
    assert src.retry(10.0) == [] and src.unresolved == 1 and not src.pending


class _Api(BaseHTTPRequestHandler):
    containers: dict[str, dict] = {}

    def do_GET(self):
        cid = self.path.split("/")[2] if self.path.startswith("/containers/") else None
        doc = self.containers.get(cid)
        body = json.dumps(doc or {"message": "no such container"}).encode()
        self.send_response(200 if doc else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass

    def address_string(self):
        return "unix"


def test_labels_from_a_docker_api_socket(tmp_path):
    sock = tmp_path / "docker.sock"
    _Api.containers = {CID: {"Name": "/rollout-4", "Config": {"Labels": {"agent-tracer.episode": "r-4"},
                                                              "Image": "agent:7"}}}
    srv = socketserver.ThreadingUnixStreamServer(str(sock), _Api)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        cfg = ContainersConfig(runtime_sockets=[str(sock)], state_dirs=[])
        src = ContainerSource(cfg)
        d = src.classify(5, f"/system.slice/docker-{CID}.scope", 0.0)
        assert d.episode == "r-4" and d.container == {"id": CID, "name": "rollout-4", "image": "agent:7"}
        assert src.classify(6, f"/system.slice/docker-{'d' * 64}.scope", 0.0) is None  # unknown: pending
        assert src.resolver.api_errors == {}
    finally:
        srv.shutdown()
        srv.server_close()


def test_doctor_says_path_rules_only_when_no_runtime_is_reachable(tmp_path):
    from episode_tracer.sources import doctor_line

    cfg = ContainersConfig(runtime_sockets=[str(tmp_path / "none.sock")], state_dirs=[str(tmp_path / "x/{id}/status")])
    ok, detail = doctor_line(cfg)
    assert "no container runtime reachable" in detail and "path rules only" in detail
    (tmp_path / "x").mkdir()
    assert "OCI state" in doctor_line(cfg)[1]
