"""Episode sources beyond the tracer's own cgroups: containers and pods.

A container's cgroup becomes an episode when

  1. a configured rule (``[[containers.rules]]``, first match wins) matches
     its path below the cgroup2 mount and names the episode directly (a
     named group ``episode``), or names the container (group ``container``)
     whose label says the episode;
  2. else a built-in pattern of a known runtime (podman, docker, containerd,
     CRI-O, the kubelet's pod cgroups) names the container, and the
     container's label ``agent-tracer.episode`` (``containers.label``) says
     the episode.

A container id is resolved to its labels, name and image from the OCI
bundle's ``config.json`` (annotations; found through the runtime's state
directory: crun, runc, containerd's shim, podman's userdata) and from the
docker/podman API socket when one answers. Results are cached per container
id and refreshed when a ``cgroup_mkdir`` record names the container's
cgroup again. Kubernetes: the pod uid and QoS class come from the kubelet's
pod cgroup path (``parse_kube_path``), namespace and name from the CRI
annotations in the container's config.json.

Pure except `Resolver` (reads files, asks the API socket); docs/episodes.md
describes every source, precedence and failure mode.
"""
from __future__ import annotations

import glob
import http.client
import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ids import EPISODE_ID_RE

DEFAULT_LABEL = "agent-tracer.episode"
DEFAULT_SOCKETS = ("/run/podman/podman.sock", "/var/run/docker.sock")
# where a runtime keeps a container's state (each `{id}` is the container id)
DEFAULT_STATE_DIRS = (
    "/run/crun/{id}/status",                                        # crun: JSON with "bundle"
    "/run/runc/{id}/state.json",                                    # runc: config.labels bundle=...
    "/run/containerd/runc/*/{id}/state.json",
    "/run/containerd/io.containerd.runtime.v2.task/*/{id}/config.json",  # containerd shim: the bundle
    "/run/containers/storage/overlay-containers/{id}/userdata/config.json",  # podman
    "/var/lib/containers/storage/overlay-containers/{id}/userdata/config.json",
)
PENDING_S = 5.0  # a container whose state is not readable yet is retried this long
API_TIMEOUT_S = 0.5
CACHE_MAX = 4096

_CID = r"(?P<container>[0-9a-f]{12,64})"
# built-in container cgroup shapes (path below the cgroup2 mount)
BUILTIN_PATTERNS = (
    ("podman", re.compile(r"/libpod-" + _CID + r"(\.scope)?(/.*)?$")),
    ("docker", re.compile(r"/docker[-/]" + _CID + r"(\.scope)?(/.*)?$")),
    ("containerd", re.compile(r"/cri-containerd-" + _CID + r"\.scope(/.*)?$")),
    ("cri-o", re.compile(r"/crio-" + _CID + r"\.scope(/.*)?$")),
    ("kubepods", re.compile(r"^/kubepods(\.slice)?/.*pod[0-9a-f_-]{36}(\.slice)?/" + _CID + r"(/.*)?$")),
)

_KUBE_SYSTEMD = re.compile(
    r"^/kubepods\.slice/(?:kubepods-(?P<qos>besteffort|burstable)\.slice/)?"
    r"kubepods-(?:(?:besteffort|burstable)-)?pod(?P<uid>[0-9a-f_]{36})\.slice"
    r"(?:/(?:cri-containerd|crio|docker)-(?P<cid>[0-9a-f]{12,64})\.scope)?")
_KUBE_CGROUPFS = re.compile(
    r"^/kubepods/(?:(?P<qos>besteffort|burstable)/)?pod(?P<uid>[0-9a-f-]{36})"
    r"(?:/(?P<cid>[0-9a-f]{12,64}))?")

# CRI annotations in a container's config.json (containerd, then CRI-O)
_POD_KEYS = {
    "namespace": ("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace"),
    "name": ("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"),
    "uid": ("io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"),
}
_NAME_KEYS = ("io.kubernetes.cri.container-name", "io.kubernetes.container.name", "nerdctl/name",
              "io.podman.annotations.name", "org.opencontainers.container.name")
_IMAGE_KEYS = ("io.kubernetes.cri.image-name", "io.kubernetes.container.image", "org.opencontainers.image.ref.name",
               "io.podman.annotations.image")


class SourcesConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    label: str | None = None  # this rule's label key (default: containers.label)
    index: int = 0


@dataclass
class ContainersConfig:
    enabled: bool = True
    label: str = DEFAULT_LABEL
    rules: list[Rule] = field(default_factory=list)
    builtin: bool = True  # the built-in runtime patterns after the rules
    runtime_sockets: list[str] = field(default_factory=lambda: list(DEFAULT_SOCKETS))
    state_dirs: list[str] = field(default_factory=lambda: list(DEFAULT_STATE_DIRS))


_KEYS = ("enabled", "label", "rules", "builtin_patterns", "runtime_sockets", "state_dirs")


def check_config(v: Any) -> dict[str, Any]:
    """The `[containers]` table of the config; ValueError naming the key.
    Returns it as given (parse_config builds the ContainersConfig)."""
    parse_config(v)
    return v


def parse_config(v: Any) -> ContainersConfig:
    if v is None or v == {}:
        return ContainersConfig()
    if not isinstance(v, dict):
        raise ValueError("expected a [containers] table")
    errs = []
    for k in v:
        if k not in _KEYS:
            errs.append(f"{k}: unknown key (known: {', '.join(_KEYS)})")
    cfg = ContainersConfig()
    if "enabled" in v:
        if not isinstance(v["enabled"], bool):
            errs.append(f"enabled: expected true or false, got {v['enabled']!r}")
        else:
            cfg.enabled = v["enabled"]
    if "builtin_patterns" in v:
        if not isinstance(v["builtin_patterns"], bool):
            errs.append(f"builtin_patterns: expected true or false, got {v['builtin_patterns']!r}")
        else:
            cfg.builtin = v["builtin_patterns"]
    if "label" in v:
        if not isinstance(v["label"], str) or not v["label"]:
            errs.append(f"label: expected a non-empty string, got {v['label']!r}")
        else:
            cfg.label = v["label"]
    for key in ("runtime_sockets", "state_dirs"):
        if key in v:
            val = v[key]
            if not isinstance(val, list) or not all(isinstance(x, str) and x.startswith("/") for x in val):
                errs.append(f"{key}: expected a list of absolute paths, got {val!r}")
            elif key == "state_dirs" and not all("{id}" in x for x in val):
                errs.append(f"state_dirs: every entry must contain {{id}} (the container id), got {val!r}")
            else:
                setattr(cfg, key, list(val))
    rules = v.get("rules", [])
    if not isinstance(rules, list):
        errs.append("rules: expected [[containers.rules]] tables")
        rules = []
    for i, r in enumerate(rules):
        where = f"rules[{i}]"
        if not isinstance(r, dict):
            errs.append(f"{where}: expected a table")
            continue
        for k in r:
            if k not in ("pattern", "label"):
                errs.append(f"{where}.{k}: unknown key (known: pattern, label)")
        pat = r.get("pattern")
        if not isinstance(pat, str) or not pat:
            errs.append(f"{where}.pattern: required, a regular expression over the cgroup path")
            continue
        try:
            rx = re.compile(pat)
        except re.error as e:
            errs.append(f"{where}.pattern: not a valid regular expression: {e}")
            continue
        groups = set(rx.groupindex)
        if not groups & {"episode", "container"}:
            errs.append(f"{where}.pattern: needs a named group (?P<episode>...) or (?P<container>...)")
            continue
        label = r.get("label")
        if label is not None and (not isinstance(label, str) or not label):
            errs.append(f"{where}.label: expected a non-empty string, got {label!r}")
            continue
        cfg.rules.append(Rule(rx, label, i))
    if errs:
        raise ValueError("; ".join(errs))
    return cfg


# ------------------------------------------------------------------ paths
def parse_kube_path(path: str) -> dict[str, Any] | None:
    """The kubelet's pod cgroup path (systemd or cgroupfs driver) ->
    {"uid", "qos", "container_id"}; None when `path` is not below a pod."""
    m = _KUBE_SYSTEMD.match(path)
    if m:
        uid = m.group("uid").replace("_", "-")
    else:
        m = _KUBE_CGROUPFS.match(path)
        if not m:
            return None
        uid = m.group("uid")
    return {"uid": uid, "qos": m.group("qos") or "guaranteed", "container_id": m.group("cid")}


@dataclass
class Match:
    """What a cgroup path says: the episode directly, or a container to resolve."""
    episode: str | None
    container_id: str | None
    label: str
    rule: str  # "rules[N]" or the built-in pattern's name
    pod: dict[str, Any] | None = None
    top: bool = True  # the container's own cgroup (not one below it)


def match_path(cfg: ContainersConfig, path: str) -> Match | None:
    """First matching rule, else the first built-in pattern. `path` is below
    the cgroup2 mount, e.g. "/machine.slice/libpod-<id>.scope"."""
    path = "/" + path.strip("/")
    kube = parse_kube_path(path)
    pod = {"uid": kube["uid"], "qos": kube["qos"]} if kube else None
    for r in cfg.rules:
        m = r.pattern.search(path)
        if m is None:
            continue
        gd = m.groupdict()
        return Match(gd.get("episode"), gd.get("container"), r.label or cfg.label, f"rules[{r.index}]", pod,
                     top=m.end() == len(path))
    if cfg.builtin:
        for name, rx in BUILTIN_PATTERNS:
            m = rx.search(path)
            if m is not None:
                cid = m.group("container")
                top = path.rstrip("/").endswith(cid) or path.rstrip("/").endswith(cid + ".scope")
                return Match(None, cid, cfg.label, name, pod, top=top)
    return None


# ----------------------------------------------------------------- resolve
@dataclass
class ContainerInfo:
    id: str
    labels: dict[str, str]
    name: str | None = None
    image: str | None = None
    runtime: str | None = None  # where the labels came from: oci:<state file>, api:<socket>
    pod: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "image": self.image}


def info_from_oci(cid: str, spec: dict[str, Any], where: str) -> ContainerInfo:
    ann = spec.get("annotations") or {}
    ann = {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {}
    name = next((ann[k] for k in _NAME_KEYS if ann.get(k)), None)
    image = next((ann[k] for k in _IMAGE_KEYS if ann.get(k)), None)
    pod = {}
    for field_, keys in _POD_KEYS.items():
        val = next((ann[k] for k in keys if ann.get(k)), None)
        if val:
            pod[field_] = val
    return ContainerInfo(cid, ann, name, image, where, pod or None)


def _bundle_of_state(state_file: str) -> str | None:
    """The bundle directory a runtime's state file names (crun's status,
    runc's state.json); a config.json found directly is its own bundle."""
    if state_file.endswith("config.json"):
        return os.path.dirname(state_file)
    try:
        with open(state_file) as f:
            st = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(st.get("bundle"), str):
        return st["bundle"]
    for lab in (st.get("config") or {}).get("labels") or []:
        if isinstance(lab, str) and lab.startswith("bundle="):
            return lab[len("bundle="):]
    return None


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def api_inspect(sock_path: str, cid: str, timeout: float = API_TIMEOUT_S) -> dict[str, Any] | None:
    """GET /containers/<id>/json on a docker/podman API socket (podman
    serves docker's compatible API); None when the container is unknown."""
    conn = _UnixHTTP(sock_path, timeout)
    try:
        conn.request("GET", f"/containers/{cid}/json")
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status == 404:
        return None
    if resp.status != 200:
        raise OSError(f"{sock_path}: HTTP {resp.status}")
    return json.loads(body)


def info_from_api(cid: str, doc: dict[str, Any], where: str) -> ContainerInfo:
    conf = doc.get("Config") or {}
    labels = {str(k): str(v) for k, v in (conf.get("Labels") or {}).items()}
    name = (doc.get("Name") or "").lstrip("/") or None
    image = conf.get("Image") or doc.get("ImageName") or None
    return ContainerInfo(cid, labels, name, image, where)


class Resolver:
    """Container id -> ContainerInfo (cached), from the OCI bundle and the API sockets."""

    def __init__(self, cfg: ContainersConfig):
        self.cfg = cfg
        self.cache: dict[str, ContainerInfo | None] = {}
        self.api_errors: dict[str, str] = {}  # socket -> last error
        self.resolved = 0
        self.misses = 0

    def forget(self, cid: str) -> None:
        self.cache.pop(cid, None)

    def sockets_reachable(self) -> list[str]:
        return [s for s in self.cfg.runtime_sockets if os.path.exists(s)]

    def state_files(self, cid: str) -> list[str]:
        out = []
        for pat in self.cfg.state_dirs:
            out.extend(sorted(glob.glob(pat.replace("{id}", glob.escape(cid)))))
        return out

    def resolve(self, cid: str) -> ContainerInfo | None:
        """None: nothing knows this container (yet)."""
        if cid in self.cache:
            return self.cache[cid]
        info: ContainerInfo | None = None
        for sf in self.state_files(cid):
            bundle = _bundle_of_state(sf)
            if not bundle:
                continue
            try:
                with open(os.path.join(bundle, "config.json")) as f:
                    spec = json.load(f)
            except (OSError, ValueError):
                continue
            info = info_from_oci(cid, spec, f"oci:{sf}")
            break
        for sp in self.cfg.runtime_sockets:
            if not os.path.exists(sp):
                continue
            try:
                doc = api_inspect(sp, cid)
            except (OSError, ValueError, http.client.HTTPException) as e:
                self.api_errors[sp] = f"{type(e).__name__}: {e}"
                continue
            self.api_errors.pop(sp, None)
            if doc is None:
                continue
            api = info_from_api(cid, doc, f"api:{sp}")
            if info is None:
                info = api
            else:  # the API's labels over the annotations; name and image where the bundle had none
                info.labels = {**info.labels, **api.labels}
                info.name = info.name or api.name
                info.image = info.image or api.image
                info.runtime += f",api:{sp}"
            break
        if info is None:
            self.misses += 1
            return None
        self.resolved += 1
        if len(self.cache) >= CACHE_MAX:
            del self.cache[next(iter(self.cache))]
        self.cache[cid] = info
        return info


@dataclass
class Decision:
    episode: str
    container: dict[str, Any] | None
    pod: dict[str, Any] | None
    rule: str


class ContainerSource:
    """cgroup path -> episode decision, with retries while a container's
    state is not readable yet (its cgroup is made before the runtime writes
    its state)."""

    def __init__(self, cfg: ContainersConfig, resolver: Resolver | None = None):
        self.cfg = cfg
        self.resolver = resolver or Resolver(cfg)
        self.pending: dict[int, tuple[str, Match, float]] = {}  # cgroup id -> (path, match, deadline)
        self.unlabelled = 0  # containers resolved without the label: not episodes
        self.bad_label = 0  # label values that are not valid episode ids
        self.unresolved = 0  # containers nothing could resolve within PENDING_S

    def classify(self, cg: int, path: str, now: float, refresh: bool = True) -> Decision | None:
        m = match_path(self.cfg, path)
        if m is None or not m.top:
            return None
        if m.container_id and refresh:
            self.resolver.forget(m.container_id)
        got = self._decide(cg, path, m, now)
        return got

    def _decide(self, cg: int, path: str, m: Match, now: float) -> Decision | None:
        info = self.resolver.resolve(m.container_id) if m.container_id else None
        pod = dict(m.pod or {})
        if info is not None and info.pod:
            pod.update(info.pod)
        cont = info.record() if info is not None else ({"id": m.container_id, "name": None, "image": None}
                                                       if m.container_id else None)
        ep = m.episode
        if ep is None:
            if info is None:
                if cg not in self.pending:
                    self.pending[cg] = (path, m, now + PENDING_S)
                return None
            ep = info.labels.get(m.label)
            self.pending.pop(cg, None)
            if ep is None:
                self.unlabelled += 1
                return None
        self.pending.pop(cg, None)
        if not EPISODE_ID_RE.match(ep):
            self.bad_label += 1
            import logging

            logging.getLogger(__name__).warning("container cgroup %s: %s=%r is not a valid episode id "
                                                "(letters, digits, . _ : -): not an episode", path, m.label, ep)
            return None
        return Decision(ep, cont, pod or None, m.rule)

    def retry(self, now: float) -> list[tuple[int, str, Decision]]:
        """Pending containers decided now: (cgroup id, path, decision)."""
        out = []
        for cg, (path, m, deadline) in list(self.pending.items()):
            if not os.path.isdir(_abs(path)):
                del self.pending[cg]
                continue
            d = self._decide(cg, path, m, now)
            if d is not None:
                out.append((cg, path, d))
            elif cg in self.pending and now >= deadline:
                del self.pending[cg]
                self.unresolved += 1
        return out

    def stats(self) -> dict[str, int]:
        return {"resolved": self.resolver.resolved, "pending": len(self.pending), "unlabelled": self.unlabelled,
                "bad_label": self.bad_label, "unresolved": self.unresolved}


def _abs(path: str) -> str:
    from .cgroups import cgroup2_mount

    return str(cgroup2_mount()) + "/" + path.strip("/")


def scan_existing(cfg: ContainersConfig, mount: Path, max_depth: int = 8) -> list[tuple[int, str]]:
    """(cgroup id, path below the mount) of every cgroup a rule or built-in
    pattern matches, for the tracer's start (containers already running)."""
    out = []
    base = str(mount).rstrip("/")
    for dirpath, dirs, _files in os.walk(base):
        rel = dirpath[len(base):] or "/"
        depth = rel.count("/")
        if depth >= max_depth:
            dirs[:] = []
        if rel == "/" or rel.startswith("/agent-tracer"):
            if rel.startswith("/agent-tracer"):
                dirs[:] = []
            continue
        m = match_path(cfg, rel)
        if m is not None and m.top:
            try:
                out.append((os.stat(dirpath).st_ino, rel))
            except FileNotFoundError:
                continue
            dirs[:] = []  # everything below is the container's
    return out


def doctor_line(cfg: ContainersConfig) -> tuple[bool, str]:
    """(ok, what) for `agent-tracer doctor`: which runtimes can be asked."""
    if not cfg.enabled:
        return True, "container episodes off (containers.enabled = false)"
    r = Resolver(cfg)
    socks = r.sockets_reachable()
    reach = []
    for s in socks:
        try:
            conn = _UnixHTTP(s, API_TIMEOUT_S)
            conn.request("GET", "/_ping")
            ok = conn.getresponse().status == 200
            conn.close()
        except (OSError, http.client.HTTPException):
            ok = False
        if ok:
            reach.append(s)
    dirs = sorted({p.split("{id}")[0] for p in cfg.state_dirs if glob.glob(p.split("{id}")[0])})
    if not reach and not dirs:
        return True, ("no container runtime reachable (no API socket answers, no runtime state dir): "
                      f"container episodes from path rules only ({len(cfg.rules)} configured)")
    parts = []
    if reach:
        parts.append("API " + ", ".join(reach))
    if dirs:
        parts.append("OCI state " + ", ".join(dirs))
    return True, f"container labels from {'; '.join(parts)} (label {cfg.label!r}, {len(cfg.rules)} rules)"

