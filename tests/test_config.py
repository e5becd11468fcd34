"""The node configuration (episode_tracer/config.py): files, config.d order, flags,
strict errors naming file and key, and `agent-tracer config show`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from episode_tracer import config
from episode_tracer.cli import main
from episode_tracer.paths import POLICY_DIR


def write(p: Path, text: str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_defaults_without_files(tmp_path):
    cfg = config.load(write(tmp_path / "config.toml", ""))
    assert all(s == "default" for s in cfg.sources.values())
    assert cfg["gate_timeout"] == 2.0 and cfg["scope"] == "episodes" and cfg["outputs"] == []
    assert config.policy_paths(cfg) == [POLICY_DIR]  # no site dir at the default path here


def test_file_then_config_d_in_lexical_order_then_flags(tmp_path):
    main_f = write(tmp_path / "config.toml", 'gate_timeout = 3.0\nmonitor = true\nlog = "/var/log/a.jsonl"\n')
    a = write(tmp_path / "config.d" / "10-a.toml", "gate_timeout = 4.0\nringbuf_pages = 1024\n")
    b = write(tmp_path / "config.d" / "20-b.toml", "gate_timeout = 5.0\n")
    write(tmp_path / "config.d" / "ignored.txt", "gate_timeout = 9\n")
    cfg = config.load(main_f, {"monitor": False})
    assert cfg.files == [main_f, a, b]
    assert cfg["gate_timeout"] == 5.0 and cfg.sources["gate_timeout"] == str(b)
    assert cfg["ringbuf_pages"] == 1024 and cfg.sources["ringbuf_pages"] == str(a)
    assert cfg["log"] == "/var/log/a.jsonl" and cfg.sources["log"] == str(main_f)
    assert cfg["monitor"] is False and cfg.sources["monitor"] == "flag --monitor"


@pytest.mark.parametrize("text,fragment", [
    ("gate_timout = 3\n", "gate_timout: unknown key"),
    ("gate_timeout = 100\n", "gate_timeout: 100 is outside"),
    ("gate_timeout = \"2\"\n", "gate_timeout: expected a number"),
    ("ringbuf_pages = 1000\n", "ringbuf_pages: 1000 is not a power of two"),
    ("monitor = 1\n", "monitor: expected true or false"),
    ("scope = \"everything\"\n", "scope: expected one of episodes, all"),
    ("metrics_listen = \"9464\"\n", "metrics_listen: expected HOST:PORT"),
    ("metrics_listen = \":9464\"\n", "metrics_listen: expected HOST:PORT with a host"),
    ("[[outputs]]\ntype = \"falco\"\n", "outputs[0].url: required for a falco output"),
    ("[[outputs]]\ntype = \"kafka\"\n", "outputs[0].type: expected one of falco, webhook, syslog"),
    ("[[outputs]]\ntype = \"webhook\"\nurl = \"ftp://x\"\n", "outputs[0].url: expected an http:// or https:// URL"),
    ("[[outputs]]\ntype = \"syslog\"\nfacility = \"mail2\"\n", "outputs[0].facility: expected one of"),
    ("[[outputs]]\ntype = \"syslog\"\nurl = \"http://x\"\n", "outputs[0].url: unknown key for a syslog output"),
    ("gate_timeout = [\n", "not valid TOML"),
])
def test_errors_name_file_and_key(tmp_path, text, fragment):
    f = write(tmp_path / "config.d" / "50-site.toml", text)
    with pytest.raises(config.ConfigError) as ei:
        config.load(write(tmp_path / "config.toml", ""))
    msg = str(ei.value)
    assert str(f) in msg and fragment in msg, msg


def test_every_error_is_reported_at_once(tmp_path):
    f = write(tmp_path / "config.toml", "nope = 1\ngate_default = \"maybe\"\n")
    with pytest.raises(config.ConfigError) as ei:
        config.load(f)
    assert len(ei.value.errors) == 2 and all(str(f) in e for e in ei.value.errors)


def test_explicit_config_must_exist(tmp_path):
    with pytest.raises(config.ConfigError, match="no such config file"):
        config.load(tmp_path / "missing.toml")


def test_bad_flag_value_names_the_flag(tmp_path):
    with pytest.raises(config.ConfigError, match="command line --metrics-listen"):
        config.load(write(tmp_path / "config.toml", ""), {"metrics_listen": "nohost"})


def test_site_policy_dir_loads_after_the_packs(tmp_path):
    site = tmp_path / "policies.d"
    f = write(tmp_path / "config.toml", f'site_policy_dir = "{site}"\n')
    assert config.policy_paths(config.load(f)) == [POLICY_DIR]  # absent: skipped
    write(site / "site.toml", "")
    assert config.policy_paths(config.load(f)) == [POLICY_DIR, site]


def test_site_policy_override_applies_to_the_packs(tmp_path):
    """A site file in policies.d disables a pack rule without editing the pack."""
    from episode_tracer.policy import load_policy

    site = tmp_path / "policies.d"
    write(site / "50-site.toml", '[[override]]\nrule = "miner-by-name"\nenabled = false\n')
    cfg = config.load(write(tmp_path / "config.toml", f'site_policy_dir = "{site}"\n'))
    res = load_policy(config.policy_paths(cfg))
    assert not res.errors, res.errors
    assert res.policy.rule("miner-by-name").enabled is False
    assert load_policy([POLICY_DIR]).policy.rule("miner-by-name").enabled is True


def test_run_options_carry_every_key(tmp_path):
    f = write(tmp_path / "config.toml", """
log = "/tmp/x.jsonl"
log_max_bytes = 1000
log_keep = 3
scope = "all"
monitor = true
ringbuf_pages = 512
control_socket = ""
gate_timeout = 1.5
gate_default = "allow"
gpu_interval = 0
relay_interval = 0
relay_min_age = 7
stats_interval = 2
metrics_listen = "127.0.0.1:9464"
verdict_dir = ""
verdict_retention = 60
[[outputs]]
type = "webhook"
url = "http://127.0.0.1:1/"
""")
    o = config.run_options(config.load(f))
    assert (o.log, o.log_max_bytes, o.log_keep, o.scope_all, o.monitor, o.ringbuf_pages) == \
        ("/tmp/x.jsonl", 1000, 3, True, True, 512)
    assert o.control_socket is None and o.verdict_dir is None and o.verdict_retention == 60
    assert (o.gate_timeout, o.gate_default, o.gpu_interval, o.relay_interval, o.relay_min_age, o.stats_interval) == \
        (1.5, "allow", 0, 0, 7, 2)
    assert o.metrics_listen == ("127.0.0.1", 9464)
    assert o.outputs[0]["type"] == "webhook" and o.outputs[0]["name"] == "webhook-0" and o.outputs[0]["retries"] == 5


def test_every_key_is_a_run_flag():
    """Every config key but the [[outputs]] and [containers] tables can be given to `run`."""
    flags = {o for p in main.commands["run"].params for o in p.opts}
    for k, key in config.KEYS.items():
        if k in ("outputs", "containers"):
            continue
        assert key.flag in flags, k


def test_config_show_json_says_where_each_value_came_from(tmp_path):
    f = write(tmp_path / "config.toml", "gate_timeout = 3.0\n")
    d = write(tmp_path / "config.d" / "x.toml", "stats_interval = 5\n")
    r = CliRunner().invoke(main, ["config", "show", "--config", str(f), "--monitor", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["files"] == [str(f), str(d)]
    c = out["config"]
    assert c["gate_timeout"] == {"value": 3.0, "source": str(f)}
    assert c["stats_interval"] == {"value": 5.0, "source": str(d)}
    assert c["monitor"] == {"value": True, "source": "flag --monitor"}
    assert c["gate_default"] == {"value": "kill", "source": "default"}
    assert set(c) == set(config.KEYS)


def test_config_show_table_and_error_exit(tmp_path):
    f = write(tmp_path / "config.toml", "gate_timeout = 3.0\n")
    r = CliRunner().invoke(main, ["config", "show", "--config", str(f)])
    assert r.exit_code == 0
    assert any(line.startswith("gate_timeout") and str(f) in line for line in r.output.splitlines())
    write(f, "gate_timeout = 300\n")
    r = CliRunner().invoke(main, ["config", "show", "--config", str(f)])
    assert r.exit_code == 1 and f"{f}: gate_timeout: 300 is outside" in r.output


def test_signature_follows_configmap_symlink_swaps(tmp_path):
    """The kubelet's atomic writer: ..data -> ..<ts>, config.toml -> ..data/config.toml."""
    d = tmp_path / "cm"
    (d / "..2026_01").mkdir(parents=True)
    (d / "..2026_01" / "config.toml").write_text("gate_timeout = 3.0\n")
    (d / "..data").symlink_to("..2026_01")
    (d / "config.toml").symlink_to("..data/config.toml")
    cfg = config.load(d / "config.toml")
    sig = cfg.signature()
    assert cfg["gate_timeout"] == 3.0 and cfg.signature() == sig
    swap_configmap(d, "..2026_02", {"config.toml": "gate_timeout = 4.0\n"})
    assert cfg.signature() != sig
    assert config.load(d / "config.toml")["gate_timeout"] == 4.0


def swap_configmap(d: Path, ts: str, files: dict[str, str]) -> None:
    """What the kubelet does on a ConfigMap update: a new timestamped
    directory, an atomic rename of ..data onto it, the old one removed."""
    import os
    import shutil

    new = d / ts
    new.mkdir()
    for name, text in files.items():
        (new / name).write_text(text)
        if not (d / name).is_symlink():
            (d / name).symlink_to(f"..data/{name}")
    old = os.readlink(d / "..data") if (d / "..data").is_symlink() else None
    tmp = d / "..data_tmp"
    tmp.symlink_to(ts)
    os.rename(tmp, d / "..data")
    if old:
        shutil.rmtree(d / old)
