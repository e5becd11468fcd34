"""Miner argv indicators (episode_tracer/policies/miners.toml) never match the command
lines of everyday tools with URLs, credentials, proxies and output flags,
and still match miners' own syntax (no root)."""
from __future__ import annotations

import shlex

import pytest

from episode_tracer.paths import POLICY_DIR
from episode_tracer.policy import load_policy, record_context

MINER_RULES = {"miner-by-argv", "mining-pool-in-argv", "miner-by-name", "miner-by-hash"}

EVERYDAY = [
    # curl
    "curl --url http://127.0.0.1:18093 -u svc-deploy-readonly:token123",
    "curl -sS -o /tmp/out.bin --url http://10.0.0.5:8080/artifact.tar.gz -u ci-bot-readonly-account:3f9a2b7c1d",
    "curl -fsSL -o model.safetensors -u hf_user:hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345 https://hub.internal:8443/m",
    "curl -x http://proxy.corp:3128 -U proxyuser:proxypass -o page.html https://example.com:443/",
    "curl --proxy socks5h://127.0.0.1:1080 --user deployer:averyveryverylongpassword12345 https://git.corp:8443/api",
    "curl -u 4f8a9b2c3d4e5f6a7b8c9d0e1f2a3b4c: https://api.internal:8443/v1/runs",
    "curl -H 'Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc' -d @payload.json http://localhost:5000/predict",
    "curl -a -o log.txt ftp://files.internal:2121/log.txt",
    "curl --retry 3 -C - -O https://download.pytorch.org:443/whl/cu121/torch-2.3.0-cp311-linux_x86_64.whl",
    # wget
    "wget -q -O data.zip --user=datasets-readonly-robot --password=s3cr3tpassw0rd http://10.1.2.3:8000/data.zip",
    "wget -o wget.log -a ethash.log --http-user=analytics-service-account --http-password=x http://h:8080/f",
    "wget -e use_proxy=yes -e http_proxy=127.0.0.1:3128 http://mirror.internal:8080/debian/dists/stable/Release",
    "wget --user-agent=Mozilla/5.0 -O - https://raw.githubusercontent.com/org/repo/main/install.sh",
    # httpie
    "http -a admin:averylongpasswordindeed12345 POST http://127.0.0.1:8888/api/kernels name=python3",
    "http --auth-type=bearer -a ghp_16C7e42F292c6912E7710c838347Ae178B4a GET https://api.github.com:443/user",
    "https --download --output=out.json GET https://pypi.org:443/pypi/requests/json",
    # git
    "git clone https://oauth2:glpat-xxxxxxxxxxxxxxxxxxxx@gitlab.corp:8443/team/repo.git",
    "git clone --depth 1 -o upstream https://github.com:443/pytorch/pytorch.git",
    "git -c http.proxy=http://127.0.0.1:3128 fetch origin main",
    "git remote add stratum-docs https://git.corp/stratum-docs.git",
    "git push -u origin feature/randomx-baseline",
    "git log --format=%H -n 1 -- src/algo.py",
    # package managers
    "pip install --index-url https://pypi.internal:8443/simple --trusted-host pypi.internal -r requirements.txt",
    "pip download -d wheels --no-deps --only-binary=:all: torch==2.3.0",
    "pip hash --algorithm sha256 dist/pkg-1.0-py3-none-any.whl",
    "pip install -U --user git+https://github.com/org/tool.git@v1.2",
    "apt-get -o Acquire::http::Proxy=http://127.0.0.1:3142 -o Dpkg::Options::=--force-confold install -y jq",
    "apt-get download -o Dir::Cache=/tmp/apt libssl3",
    "npm install --registry http://127.0.0.1:4873 --userconfig .npmrc left-pad",
    "npm config set //registry.npmjs.org/:_authToken npm_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
    "cargo build --release --target-dir /tmp/target -j 2",
    "cargo install --git https://github.com:443/org/crate.git --locked",
    "conda install -c conda-forge -y numpy",
    "uv pip install --index-url http://127.0.0.1:3141/root/pypi/+simple/ requests",
    # others agents run
    "sha256sum -c SHA256SUMS",
    "b3sum --algo blake3 big.bin",
    "openssl passwd -6 -salt abc secret",
    "python3 train.py --model randomx --algo ppo --coins-per-episode 3 --workers 8",
    "hashcat -a 3 -m 0 hashes.txt",
    "ssh-keygen -a 100 -t ed25519 -f key -N ''",
    "tar xjf examine.bz2",
    "docker run --rm -p 3333:3333 -e WORKER=1 my/app",
    "gunicorn --workers 4 --worker-class uvicorn.workers.UvicornWorker app:app",
]

MINERS = [
    ("xmrig -o pool.supportxmr.com:443 -u 48edfHu7V9Z84YzzMa6fUueoELZ9ZRXq9VetWzYGzKt52XU5xvqgzYnDK9URnRoJMk1j8nLwEVsaSWJ4fhdUyZijBGUicoD -k --tls", "miner-by-name"),
    ("/tmp/w -o 10.1.2.3:3333 -u 48edfHu7V9Z84YzzMa6fUueoELZ9ZRXq9VetWzYGzKt52XU5xvqgzYnDK9URnRoJMk1j8nLwEVsaSWJ4fhdUyZijBGUicoD -p x", "miner-by-argv"),
    ("/tmp/w --url=10.1.2.3:4444 --user=0x52bc44d5378309EE2abF1539BF71dE1b7d7bE3b5.rig1", "miner-by-argv"),
    ("/tmp/w -o stratum+tcp://10.0.0.5:3333 -u x", "miner-by-argv"),
    ("/tmp/w -a rx/0 -o 10.0.0.5:3333", "miner-by-argv"),
    ("/tmp/w --algo=kawpow", "miner-by-argv"),
    ("/tmp/w -a sha256d", "miner-by-argv"),
    ("/tmp/w --donate-level 1", "miner-by-argv"),
    ("/tmp/w -o stratum.example.net:3333", "miner-by-argv"),
    ("/tmp/w --url=gulf.moneroocean.stream:10128", "mining-pool-in-argv"),
    ("/tmp/w --rig-id r1", "miner-by-argv"),
]


@pytest.fixture(scope="module")
def policy():
    res = load_policy([POLICY_DIR])
    assert not res.errors
    return res.policy


def _exec(cmd: str) -> dict:
    argv = shlex.split(cmd)
    name = argv[0].rsplit("/", 1)[-1]
    return {"type": "exec", "episode": "ep-1", "pid": -7, "uid": 1000, "argv": argv,
            "exe": argv[0] if argv[0].startswith("/") else f"/usr/bin/{name}", "comm": name[:15]}


@pytest.mark.parametrize("cmd", EVERYDAY)
def test_everyday_tools_are_no_miners(policy, cmd):
    got = {v.rule for v in policy.evaluate(_exec(cmd), record_context({}))}
    assert not got & MINER_RULES, (cmd, got)


@pytest.mark.parametrize("cmd,rule", MINERS)
def test_miner_syntax_still_matches(policy, cmd, rule):
    assert rule in {v.rule for v in policy.evaluate(_exec(cmd), record_context({}))}
