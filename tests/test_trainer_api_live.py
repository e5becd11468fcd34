"""The trainer API's live verdict stream (issue 13): `async with
tracer.episode(...)` streams the episode's alerts as they happen (here an
enforced deny of a loopback connect), the trainer ends the rollout at the
first enforced alert, and the stream ends with the episode's end record;
the blocking form does the same for a clean episode."""
from __future__ import annotations

import asyncio
import socket
import sys
import uuid

import pytest

pytestmark = pytest.mark.root


def policy(tmp_path, port):
    d = tmp_path / "pol"
    d.mkdir()
    (d / "00-trainer.toml").write_text(f"""
[[rule]]
name = "trn-blk-loopback"
severity = "high"
on = "connect"
action = "deny"
match = {{ addr = "127.0.0.0/8", port = {port}, episode = {{ glob = "trnapi-*" }} }}
""")
    return d


@pytest.fixture
def served(live_tracer, tmp_path):
    from episode_tracer.episode_ops import apply_episode_command
    from episode_tracer.service import _make_state, control_server

    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    port = lst.getsockname()[1]
    sock = tmp_path / "run" / "control.sock"
    t = live_tracer(policy=True, policy_dirs=[policy(tmp_path, port)], monitor=False, control_socket=sock,
                    verdict_dir=tmp_path / "verdicts").start()
    state = _make_state(t.rt)
    srv = control_server(t.rt, state.snapshot, lambda c, a: apply_episode_command(t.rt, state, c, a), None)
    # as `run` serves it: alerts and episode ends reach the stream
    t.rt.add_observer(lambda r: srv.publish_alert(r) if r["type"] == "alert" else
                      srv.publish_end(r) if r["type"] == "episode_end" else None)
    srv.start()
    try:
        yield t, sock, port
    finally:
        srv.close()
        lst.close()


def test_async_stream_ends_the_rollout_at_the_first_enforced_alert(served):
    import episode_tracer as tracer

    t, sock, port = served
    ep = f"trnapi-{uuid.uuid4().hex[:6]}"
    agent = [sys.executable, "-S", "-c",
             "import socket,time\ntry:\n socket.create_connection(('127.0.0.1', %d), 5)\nexcept OSError:\n pass\n"
             "time.sleep(120)\n" % port]

    async def trainer():
        seen = []
        async with tracer.episode(ep, agent, control_socket=sock) as e:
            async for v in e.verdicts():
                seen.append(v)
                if v["type"] == "alert" and v.get("enforced"):
                    await e.kill()
            res = await e.wait()
        return seen, res

    seen, res = asyncio.run(asyncio.wait_for(trainer(), 120))
    alerts = [v for v in seen if v["type"] == "alert"]
    assert alerts and alerts[0]["rule"] == "trn-blk-loopback" and alerts[0]["enforced"]
    assert seen[-1]["type"] == "end" and seen[-1]["episode"] == ep
    assert res.killed_by_policy and res.signal == 9  # the trainer's kill, through the tracer
    assert [a["rule"] for a in res.alerts] == ["trn-blk-loopback"]


def test_blocking_form_of_a_clean_episode(served):
    import episode_tracer as tracer

    t, sock, _port = served
    ep = f"trnapi-{uuid.uuid4().hex[:6]}"
    with tracer.episode_sync(ep, ["/bin/sh", "-c", "exit 4"], control_socket=sock) as e:
        seen = list(e.verdicts())
        res = e.wait()
    assert [v["type"] for v in seen] == ["end"]
    assert res.exit_code == 4 and not res.alerts and not res.killed_by_policy
