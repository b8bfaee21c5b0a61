"""``polyadapter serve --replicas 2 --ray-address ADDR`` joins a Ray cluster started
with ``ray start --head`` (on 127.0.0.1, as a real cluster's head would be started)
instead of starting Ray itself: both replicas answer, with the single engine's
outputs, and stopping the server removes its deployment but leaves the cluster up.
Every wait is bounded."""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")

import httpx  # noqa: E402
from server_kit import Server, build_folder  # noqa: E402

import polyadapter as pa  # noqa: E402
from polyadapter.basemodels import load_causal_lm  # noqa: E402
from polyadapter.serve import Engine, SamplingParams  # noqa: E402

HEADER = "x-polyadapter-replica"
pytestmark = pytest.mark.slow  # about 70 s: a Ray head of its own, then 2 replicas


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_exe() -> str:
    """The ``ray`` command of this venv (else the one on PATH)."""
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else shutil.which("ray")


def _ray(*args, env=None, **kw):
    return subprocess.run([_ray_exe(), *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})), **kw)


@pytest.fixture(scope="module")
def cluster():
    """A Ray head on 127.0.0.1 with token authentication, as a cluster should run;
    ``--block`` keeps it in one process group, which terminating stops."""
    port = _free_port()
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep Ray on the loopback (see serve/replicas.py)
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    head = subprocess.Popen([_ray_exe(), "start", "--head", "--block",
                             "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard", "false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, **env))
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while _ray("status", "--address", address, env=env).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(1)
        yield address, env
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)


def test_serve_joins_a_running_cluster(cluster, tmp_path):
    address, env = cluster
    made = build_folder(tmp_path)
    lora = made["adapters"]["lora"]
    server = Server(["--model", str(made["model"]), "--replicas", "2", "--ray-address", address,
                     "--adapter", f"lora={lora}"], timeout=240, env=env)
    try:
        model, tok = load_causal_lm(made["model"])
        engine = Engine(pa.AdapterModel(model), tok)
        engine.register_adapter("lora", lora)
        ref = engine.generate(["hello world"], ["lora"], SamplingParams(max_tokens=8, temperature=0,
                                                                         ignore_eos=True))[0].text
        engine.close()
        replicas = set()
        deadline = time.monotonic() + 60
        for _ in range(20):  # /v1/models requests are spread over both replicas
            assert time.monotonic() < deadline
            r = httpx.post(server.url + "/v1/completions", timeout=60,
                           json={"model": "lora", "prompt": "hello world", "max_tokens": 8, "temperature": 0,
                                 "ignore_eos": True})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref, r.text
            replicas.add(httpx.get(server.url + "/v1/models", timeout=30).headers[HEADER])
            if len(replicas) == 2:
                break
        assert len(replicas) == 2, replicas
    finally:
        server.stop()
    assert server.proc.returncode == 0, "".join(server.output)
    status = _ray("status", "--address", address, env=env)
    assert status.returncode == 0, status.stdout + status.stderr  # the cluster outlives the server
