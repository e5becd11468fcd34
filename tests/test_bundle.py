"""The offline bundle (make bundle): built here for this machine's release,
installed inside `unshare -n` (no network at all, so no registry) into a
fresh venv, and the tracer started from that install (root, slow: the
build downloads about 140 MB of .debs)."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest

from at_testlib import LIVE_LOCK, wait_for

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.root, pytest.mark.slow]


def codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    return ""


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("apt-get") is None,
                    reason="needs unshare and apt-get (Debian/Ubuntu)")
@pytest.mark.timeout(1200)
def test_bundle_installs_with_no_network_and_the_tracer_starts(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: installs packages and loads BPF programs")
    out = tmp_path / "out"
    r = subprocess.run(["bash", "scripts/bundle.sh", codename(), str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tarball = next(out.glob("agent-tracer-bundle-*.tar.gz"))
    with tarfile.open(tarball) as tf:
        names = tf.getnames()
    top = names[0].split("/")[0]
    manifest = json.loads(tarfile.open(tarball).extractfile(f"{top}/manifest.json").read())
    assert manifest["distro"] == codename()
    debs = " ".join(manifest["debs"])
    for p in ("python3-bpfcc_", "libbpfcc_", "libllvm14_", "libclang-cpp14_", "bpftool_", "linux-headers-"):
        assert p in debs, p
    assert any(w.startswith(manifest["distribution"].replace("-", "_")) for w in manifest["wheels"])
    assert any(w.startswith("prometheus_client") for w in manifest["wheels"])
    # refuses another release
    bad = subprocess.run(["bash", "scripts/bundle.sh", "no-such-release", str(out)], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "not no-such-release" in bad.stderr

    # install from the bundle's own installer with no network namespace access at all
    unpack = tmp_path / "unpack"
    unpack.mkdir()
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(unpack)], check=True)
    venv = tmp_path / "venv"
    r = subprocess.run(["unshare", "-n", "bash", str(unpack / top / "install.sh"), "--offline", str(tarball),
                        "--venv", str(venv)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/none"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (venv / "bin" / "agent-tracer").exists()

    log = tmp_path / "events.jsonl"
    lock = open(LIVE_LOCK, "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    p = subprocess.Popen([str(venv / "bin" / "agent-tracer"), "run", "--no-dashboard", "--log", str(log),
                          "--control-socket", "", "--verdict-dir", "", "--gpu-interval", "0", "--site-policy-dir", ""],
                         cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        def ready():
            if p.poll() is not None or not log.exists():
                return None
            return next((json.loads(x) for x in log.read_text().splitlines() if '"ready"' in x), None)

        rec = wait_for(ready, timeout=180, interval=0.2)
        assert rec, (p.poll(), p.stderr.read().decode()[-3000:] if p.poll() is not None else "")
        assert rec["programs"] and all(v == "ok" for v in rec["selftest"].values()), rec["selftest"]
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        lock.close()
