"""Ray Serve scale-out on the CPU: 2 replicas of the tiny package behind the same HTTP API; requests of one
adapter set keep going to the replica that holds that set (`@serve.multiplexed` by adapter-set id)."""

from __future__ import annotations

import shutil
import socket
import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

BODY = {"prompt": "a lighthouse at dusk", "size": "64x64", "steps": 2, "max_sequence_length": 32}
SETS = {"attn": [{"name": "tiny-style-attn", "scale": 1.0}], "mlp": [{"name": "tiny-style-mlp", "scale": 0.8}],
        "all": [{"name": "tiny-style-all", "scale": 1.0}], "stack": [{"name": "tiny-style-attn", "scale": 1.0},
                                                                    {"name": "tiny-style-mlp", "scale": 0.5}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server(tiny_package, demo_loras, tmp_path_factory):
    from aotpack.serve.ray_app import build_app

    adapters = tmp_path_factory.mktemp("ray-loras")
    for name, path in demo_loras.items():
        shutil.copy(path, adapters / f"{name}.safetensors")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"package": str(tiny_package), "model": "tiny", "adapters": [str(adapters)],
                             "replicas": 2, "num_cpus": 1, "options": {"max_queue": 8}}),
                  name="aotpack", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 150
        ready = set()
        while len(ready) < 2:  # both replicas loaded (readyz answers from one replica at a time)
            answer = httpx.get(f"{url}/readyz", timeout=10)
            if answer.status_code == 200:
                ready.add(answer.json()["replica"])
            assert time.monotonic() < deadline, f"replicas not ready: {ready}, {answer.text}"
            time.sleep(0.3)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def generate(url, loras):
    answer = httpx.post(f"{url}/v1/images/generations", json=dict(BODY, loras=loras), timeout=120)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["replica"] == answer.headers["x-aotpack-replica"]
    assert [{"name": a["name"], "scale": a["scale"]} for a in data["adapters"]] == loras
    return data["replica"]


def test_requests_go_to_the_replica_that_holds_their_adapter_set(ray_server):
    first = {label: generate(ray_server, loras) for label, loras in SETS.items()}
    assert len(set(first.values())) == 2  # the sets were spread over both replicas
    time.sleep(2.0)  # replicas report their loaded sets to the router
    for _ in range(3):
        for label, loras in SETS.items():
            assert generate(ray_server, loras) == first[label], label


def test_same_api_errors_and_adapters(ray_server):
    unknown = httpx.post(f"{ray_server}/v1/images/generations", json=dict(BODY, loras=[{"name": "nope"}]), timeout=60)
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "unknown_adapter"
    path = httpx.post(f"{ray_server}/v1/images/generations", json=dict(BODY, loras=[{"name": "/etc/passwd"}]),
                      timeout=60)
    assert path.status_code == 422 and path.json()["error"]["type"] == "adapter_not_allowed"
    bad_size = httpx.post(f"{ray_server}/v1/images/generations", json=dict(BODY, size="4096x4096"), timeout=60)
    assert bad_size.status_code == 422
    names = {a["name"] for a in httpx.get(f"{ray_server}/v1/adapters", timeout=30).json()["data"]}
    assert names == {"tiny-style-attn", "tiny-style-mlp", "tiny-style-all"}
    assert httpx.post(f"{ray_server}/v1/adapters", json={"name": "x", "source": "y"}).status_code == 501
    assert "aotpack_lora_switches_total" in httpx.get(f"{ray_server}/metrics", timeout=30).text


def test_a_misspelt_option_is_refused_before_any_replica_starts(tiny_package):
    from aotpack.errors import AotpackError
    from aotpack.serve.ray_app import adapter_set_id, build_app

    with pytest.raises(AotpackError, match=r"options \['max_queu'\] are not serve options"):
        build_app({"package": str(tiny_package), "options": {"max_queu": 8}})  # it killed each replica
    # close scales are different sets (":g" made 0.1234567 and 0.1234568 one routing id)
    assert adapter_set_id([{"name": "a", "scale": 0.1234567}]) != adapter_set_id([{"name": "a", "scale": 0.1234568}])
