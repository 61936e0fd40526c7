"""`aotpack serve` as a real process on loopback, under httpx: the images equal `aotpack run`'s, and the
server refuses what it must (429, 4xx, 401, paths) without going down; a client that leaves cancels
its queued request. Tiny package, 64x64, 2 steps."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TOKEN = "test-token"
ADAPTERS = ["tiny-style-attn", "tiny-style-mlp", "tiny-style-all", "tiny-extra"]
BODY = {"prompt": "a lighthouse at dusk", "size": "64x64", "steps": 2, "max_sequence_length": 32}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, demo_loras):
    """The 3 demo LoRAs + a 4th, a rank-64 one (above the package's max_rank 32) and a broken file."""
    from safetensors.torch import save_file

    from aotpack.demo import random_lora_state_dict
    from aotpack.models.tiny import make_transformer

    directory = tmp_path_factory.mktemp("served-loras")
    for name, path in demo_loras.items():
        shutil.copy(path, directory / f"{name}.safetensors")
    model = make_transformer()
    save_file(random_lora_state_dict(model, 8, ["*"], seed=7), str(directory / "tiny-extra.safetensors"))
    save_file(random_lora_state_dict(model, 64, ["transformer_blocks.*"], seed=8),
              str(directory / "too-big.safetensors"))
    (directory / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    (directory / "spare").mkdir()  # a file registered over HTTP later
    shutil.copy(demo_loras["tiny-style-mlp"], directory / "spare" / "later.safetensors")
    (directory / "to-register").mkdir()  # a file registered by racing requests
    shutil.copy(demo_loras["tiny-style-attn"], directory / "to-register" / "raced.safetensors")
    return directory


@pytest.fixture(scope="module")
def server(tiny_package, adapter_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = dict(os.environ, AOTPACK_TOKEN=TOKEN, HF_HUB_OFFLINE="1")
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "aotpack", "serve", str(tiny_package), "--model", "tiny", "--port", str(port),
             "--adapters", str(adapter_dir), "--max-queue", "3", "--max-wait", "30"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready in 180 s:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def post(url, body, timeout=120, **kwargs):
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout, **kwargs)


def steps_lasting(url, seconds: float, size: str = "256x256") -> int:
    """Steps for which one request at `size` keeps the model busy about `seconds` now (the shared CPU's
    speed varies tenfold with load, so tests that need a busy worker measure it first)."""
    # the faster of two probes: the first call at a new size can carry one-off costs, which would make
    # the busy request too short (a flaky pass of the queued request in the disconnect test)
    probe = min(post(url, dict(BODY, size=size, steps=4)).json()["timings"]["steps"] / 4 for _ in range(2))
    return max(4, min(1000, math.ceil(seconds / max(probe, 1e-4))))


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def metric(url, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_concurrent_requests_over_4_adapters_equal_aotpack_run(server, tiny_package, adapter_dir, tmp_path):
    requests = [dict(BODY, seed=10 + i, loras=[{"name": ADAPTERS[i % 4], "scale": 0.8}]) for i in range(8)]
    switches_before = metric(server, "aotpack_lora_switches_total")
    with ThreadPoolExecutor(3) as pool:  # 3 in flight: within the queue bound of 3
        answers = list(pool.map(lambda body: post(server, body), requests))
    assert [a.status_code for a in answers] == [200] * 8, [a.text[:300] for a in answers]
    for body, answer in zip(requests, answers):
        data = answer.json()
        assert [{"name": a["name"], "scale": a["scale"]} for a in data["adapters"]] == body["loras"]
        assert set(data["timings"]) >= {"queue", "switch", "steps", "decode"} and data["timings"]["steps"] > 0
    assert metric(server, "aotpack_lora_switches_total") - switches_before >= 4

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({
        "prompt": b["prompt"], "seed": b["seed"], "steps": 2, "height": 64, "width": 64, "max_sequence_length": 32,
        "loras": [[str(adapter_dir / f"{b['loras'][0]['name']}.safetensors"), 0.8]],
        "out": str(tmp_path / f"{i}.png")}) + "\n" for i, b in enumerate(requests)))
    run = subprocess.run([sys.executable, "-m", "aotpack", "run", str(tiny_package), "--model", "tiny",
                          "--requests", str(jobs)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for i, answer in enumerate(answers):
        served = pixels(base64.b64decode(answer.json()["data"][0]["b64_json"]))
        reference = pixels((tmp_path / f"{i}.png").read_bytes())
        assert served.shape == (64, 64, 3)
        diff = np.abs(served.astype(int) - reference).max()
        assert np.array_equal(served, reference), f"request {i}: max diff {diff}"
    assert not np.array_equal(pixels(base64.b64decode(answers[0].json()["data"][0]["b64_json"])),
                              pixels(base64.b64decode(answers[1].json()["data"][0]["b64_json"])))

    png = post(server, dict(requests[0], response_format="png"))
    assert png.headers["content-type"] == "image/png"
    assert np.array_equal(pixels(png.content), pixels((tmp_path / "0.png").read_bytes()))
    two = post(server, dict(requests[0], n=2)).json()["data"]  # image i uses seed + i
    assert np.array_equal(pixels(base64.b64decode(two[0]["b64_json"])), pixels((tmp_path / "0.png").read_bytes()))


def test_queue_full_answers_429_with_retry_after(server):
    steps = steps_lasting(server, 2.0)  # all 10 arrive while the first batch runs
    bodies = [dict(BODY, size="256x256", steps=steps, seed=i, loras=[{"name": ADAPTERS[i % 4]}]) for i in range(10)]
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda body: post(server, body), bodies))
    codes = [a.status_code for a in answers]
    assert set(codes) == {200, 429} and codes.count(429) >= 4, codes
    full = next(a for a in answers if a.status_code == 429)
    assert int(full.headers["retry-after"]) >= 1
    assert full.json()["error"]["type"] == "queue_full" and full.json()["error"]["fix"]
    assert post(server, BODY).status_code == 200


@pytest.mark.parametrize("name, status, kind", [
    ("too-big", 422, "invalid_adapter"),  # rank 64 > max_rank 32
    ("broken", 422, "invalid_adapter"),
    ("nope", 404, "unknown_adapter"),
])
def test_bad_adapter_is_refused_and_the_next_request_works(server, name, status, kind):
    answer = post(server, dict(BODY, loras=[{"name": name}]))
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["type"] == kind and error["message"] and error["fix"]
    assert post(server, dict(BODY, loras=[{"name": "tiny-style-attn"}])).status_code == 200


def test_bad_fields_are_422(server):
    for bad in [{"size": "64"}, {"size": "4096x4096"}, {"steps": 0}, {"n": 0}, {"n": 5}, {"guidance": 1e9},
                {"unknown": 1}, {"prompt": 3}, {"loras": [{"name": "tiny-style-attn", "scale": 1e6}]}]:
        answer = post(server, dict(BODY, **bad))
        assert answer.status_code == 422, (bad, answer.text)
        assert answer.json()["error"]["type"] == "invalid_request"


def test_refused_bodies_name_the_field_and_value_and_every_answer_is_counted(server):
    before = metric(server, 'aotpack_request_seconds_count{status="422"}')
    url = f"{server}/v1/images/generations"
    strict = [({"steps": True}, "steps = True"), ({"steps": "2"}, "steps = '2'"), ({"seed": "7"}, "seed = '7'"),
              ({"n": "2"}, "n = '2'"), ({"loras": [{"name": "tiny-style-attn", "scale": True}]}, "scale = True"),
              ({"size": "6_4x64"}, "size '6_4x64'"), ({"n": 2, "response_format": "png"}, '"png" with n = 2')]
    for bad, named in strict:  # converted before (a bool became 1 step), now refused with the value
        answer = post(server, dict(BODY, **bad))
        assert answer.status_code == 422, (bad, answer.text)
        error = answer.json()["error"]
        assert error["type"] == "invalid_request" and named in error["message"], (bad, error)
    # a lone surrogate: tokenizers refuse it mid-batch (it failed other clients' requests batched with it)
    surrogate = httpx.post(url, content=json.dumps(dict(BODY, prompt="x \ud800")).encode(),
                           headers={"content-type": "application/json"}, timeout=60)
    assert surrogate.status_code == 422 and "lone surrogate" in surrogate.json()["error"]["message"]
    broken = httpx.post(url, content=b'{"prompt": "a", ', headers={"content-type": "application/json"}, timeout=60)
    assert broken.status_code == 422 and "not valid JSON" in broken.json()["error"]["message"], broken.text
    assert metric(server, 'aotpack_request_seconds_count{status="422"}') - before == len(strict) + 2
    for method, path, status, kind in [("GET", "/nope", 404, "not_found"),
                                       ("GET", "/v1/images/generations", 405, "method_not_allowed")]:
        answer = httpx.request(method, f"{server}{path}", timeout=30)
        assert answer.status_code == status and answer.json()["error"]["type"] == kind, answer.text
        assert answer.json()["error"]["fix"]
    not_utf8 = httpx.post(url, content=b'{"prompt": "\xff"}', headers={"content-type": "application/json"})
    assert not_utf8.status_code in (400, 422) and not_utf8.json()["error"]["type"] == "invalid_request"


def test_the_answer_says_the_size_made_and_the_largest_seed_is_taken(server):
    answer = post(server, dict(BODY, size="72x100", seed=2**63 - 1))  # seeds seed..seed+n-1 fit torch's range
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["size"] == "64x96" and "produced as 64x96" in data["notes"][0]
    assert pixels(base64.b64decode(data["data"][0]["b64_json"])).shape == (96, 64, 3)
    over = post(server, dict(BODY, seed=2**63 - 1, n=2))
    assert over.status_code == 422 and "seed" in over.json()["error"]["message"]


def test_a_path_or_url_in_a_request_is_refused(server, adapter_dir):
    for name in [str(adapter_dir / "tiny-style-attn.safetensors"), "../tiny-style-attn", "/etc/passwd",
                 "hf://owner/repo@main/style.safetensors", "owner/repo/style.safetensors"]:
        answer = post(server, dict(BODY, loras=[{"name": name}]))
        assert answer.status_code == 422, (name, answer.text)
        assert answer.json()["error"]["type"] == "adapter_not_allowed"


def test_registering_needs_the_token_and_an_allowed_source(server, adapter_dir):
    body = {"name": "later", "source": str(adapter_dir / "spare" / "later.safetensors")}
    assert httpx.post(f"{server}/v1/adapters", json=body).status_code == 401
    wrong = httpx.post(f"{server}/v1/adapters", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "unauthorized"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    outside = httpx.post(f"{server}/v1/adapters", json={"name": "x", "source": "/etc/hostname"}, headers=auth)
    assert outside.status_code == 422 and outside.json()["error"]["type"] == "adapter_not_allowed"
    too_big = httpx.post(f"{server}/v1/adapters", headers=auth, timeout=60,
                         json={"name": "big2", "source": str(adapter_dir / "too-big.safetensors")})
    assert too_big.status_code == 422 and "max_rank" in too_big.json()["error"]["message"]
    created = httpx.post(f"{server}/v1/adapters", json=body, headers=auth, timeout=60)
    assert created.status_code == 201, created.text
    later = (adapter_dir / "spare" / "later.safetensors").read_bytes()
    assert created.json() == {"name": "later", "source": body["source"], "rank": 8, "bytes": len(later), "cached": True,
                              "sha256": hashlib.sha256(later).hexdigest(), "revision": None, "commit_hash": None}
    listed = {a["name"]: a for a in httpx.get(f"{server}/v1/adapters").json()["data"]}
    assert set(listed) >= set(ADAPTERS) | {"later", "too-big", "broken"} and "big2" not in listed
    assert listed["tiny-style-all"]["rank"] == 16
    assert post(server, dict(BODY, loras=[{"name": "later"}])).status_code == 200


def test_racing_registrations_of_one_name_register_it_once(server, adapter_dir):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"name": "raced", "source": str(adapter_dir / "to-register" / "raced.safetensors")}
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: httpx.post(f"{server}/v1/adapters", json=body, headers=auth, timeout=60),
                                range(3)))
    assert sorted(a.status_code for a in answers) == [201, 422, 422], [a.text for a in answers]
    assert all("already registered" in a.json()["error"]["message"] for a in answers if a.status_code == 422)
    nul = httpx.post(f"{server}/v1/adapters", headers=auth, timeout=60,
                     json={"name": "nul", "source": str(adapter_dir / "spare" / "a\u0000.safetensors")})
    assert nul.status_code == 422 and nul.json()["error"]["type"] == "adapter_not_allowed", nul.text


def test_a_client_that_leaves_cancels_its_queued_request(server):
    before_cancelled = metric(server, 'aotpack_cancelled_total{reason="disconnect"}')
    # the largest size the tiny package takes: at 256x256 a step is ~1 ms and even the 1000-step cap ended
    # the busy request before the queued one's client left
    steps = steps_lasting(server, 5.0, size="1024x1024")
    before_batches = metric(server, "aotpack_batch_images_count")
    slow = threading.Thread(target=post, args=(server, dict(BODY, size="1024x1024", steps=steps, seed=99)))
    slow.start()
    time.sleep(0.5)  # the slow request is on the model; the next one waits in the queue
    with pytest.raises(httpx.ReadTimeout):
        post(server, dict(BODY, seed=100, loras=[{"name": "tiny-style-all"}]), timeout=0.5)
    slow.join(120)
    time.sleep(0.5)
    assert metric(server, 'aotpack_cancelled_total{reason="disconnect"}') == before_cancelled + 1
    assert metric(server, "aotpack_batch_images_count") == before_batches + 1  # only the slow one ran
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}


def test_health_ready_and_metrics(server):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server}/readyz").json()
    assert ready["status"] == "ready" and ready["max_batch"] == 4
    text = httpx.get(f"{server}/metrics").text
    for name in ("aotpack_request_seconds_bucket", "aotpack_queue_depth", "aotpack_lora_switches_total",
                 "aotpack_lora_switch_ms_bucket", "aotpack_adapter_cache_hits_total",
                 "aotpack_adapter_cache_misses_total", "aotpack_step_ms_bucket", "aotpack_gpu_memory_bytes",
                 "aotpack_lora_merges_total", 'aotpack_lora_mode{mode="slots"}'):
        assert name in text, name


def test_serve_load_benchmark_affinity_vs_fifo(tiny_package, tmp_path):
    """`aotpack bench serve-load` end to end (in-process server on loopback), tiny and bounded."""
    from aotpack.bench.serve_load import main

    main(["--package", str(tiny_package), "--model", "tiny", "--out", str(tmp_path), "--requests", "16",
          "--adapters", "4", "--rank", "4", "--size", "64x64", "--steps", "2", "--max-sequence-length", "32",
          "--lora-dir", str(tmp_path / "loras"), "--time-limit", "120"])
    results = json.loads((tmp_path / "serve_load.json").read_text())
    by = {r["policy"]: r for r in results["policies"]}
    assert set(by) == {"affinity", "fifo"}
    for r in by.values():
        assert r["completed"] == 16 and r["latency_s"]["p50"] > 0 and r["throughput_images_per_s"] > 0
        assert 0 <= r["prefetch_hit_rate"] <= 1
    used = sum(1 for n in results["adapter_popularity"].values() if n)
    # every adapter in use is switched to at least once; affinity (about once each in a burst) never more than FIFO
    assert used <= by["affinity"]["switches"] <= by["fifo"]["switches"]
    assert "| affinity | 16/16 |" in (tmp_path / "serve_load.md").read_text()
