"""The package: one version source, a wheel that carries the BPF sources,
the policy packs and the service files, and a tracer installed from that
wheel into a fresh venv (system site packages for the distro's bcc) that
starts with the default packs (root)."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import episode_tracer
from at_testlib import LIVE_LOCK, wait_for

ROOT = Path(__file__).resolve().parent.parent
PKG = episode_tracer.__name__


def test_one_version_source():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta.get("dynamic") == ["version"] and "version" not in meta
    import importlib.metadata as md

    assert md.version(meta["name"]) == episode_tracer.__version__


def test_package_data_found_through_importlib_resources():
    from importlib import resources

    from episode_tracer import paths

    base = Path(str(resources.files(PKG)))
    assert paths.BPF_DIR == base / "bpf" and (paths.BPF_DIR / "tracer.c").is_file()
    assert paths.POLICY_DIR == base / "policies" and (paths.POLICY_DIR / "base.toml").is_file()
    assert paths.data_file("agent-tracer.service").is_file() and paths.data_file("config.toml").is_file()


def test_python_m_package_runs():
    r = subprocess.run([sys.executable, "-m", PKG, "--version"], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0 and episode_tracer.__version__ in r.stdout, r.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                        str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    whl = list(out.glob("*.whl"))
    assert len(whl) == 1, whl
    return whl[0]


@pytest.mark.slow
def test_wheel_carries_bpf_policies_and_service_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("bpf/tracer.c", "bpf/events.h", "bpf/maps.h", "policies/base.toml", "policies/miners.toml",
              "policies/miner_sha256.txt", "data/agent-tracer.service", "data/config.toml", "__main__.py"):
        assert f"{PKG}/{f}" in names, f
    for h in (ROOT / PKG / "bpf").glob("*.h"):
        assert f"{PKG}/bpf/{h.name}" in names, h.name
    for t in (ROOT / PKG / "policies").glob("*.toml"):
        assert f"{PKG}/policies/{t.name}" in names, t.name


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tracer_from_the_wheel_in_a_fresh_venv_runs_the_default_packs(wheel, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs")
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # the installed copy, not the checkout: its policies live in the venv
    r = subprocess.run([str(py), "-c", f"import {PKG}.paths as p; print(p.POLICY_DIR); print(p.BPF_DIR)"],
                       capture_output=True, text=True, cwd=tmp_path, check=True)
    pol, bpf = r.stdout.split()
    assert pol.startswith(str(venv)) and bpf.startswith(str(venv)), r.stdout
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
        assert rec["programs"] and rec["policy_version"] and rec["mode"] == "enforce"
        assert all(v == "ok" for v in rec["selftest"].values()), rec["selftest"]
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        lock.close()
