"""Adapter provenance: each parsed adapter records the sha256 of the bytes it was parsed from and, for a Hub file,
the revision asked for and the commit it resolved to; `aotpack run --report` and the HTTP service show them.

Real parses of real files; Hub files come from huggingface_hub's own client talking to the offline fake hub
(`fake_hub.py`), so the commits are the fake hub's and known here."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from click.testing import CliRunner
from fake_hub import ENDPOINT, FakeHub

from aotpack.adapters import parse_adapter, parse_state_dict
from aotpack.adapters.files import load_safetensors
from aotpack.cli import cli
from aotpack.runtime.jobs import adapters_used

TOKEN = "hub-write-token"
REPO = "owner/loras"
HUB_FILE = "sub/style.safetensors"  # in a subfolder: the commit is not the file's parent folder


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def hub(monkeypatch, tmp_path, demo_loras):
    """A fake hub holding REPO with two commits of HUB_FILE (tiny-style-mlp's bytes, then tiny-style-all's);
    huggingface_hub online against it, its cache in tmp_path. Yields (hub, [(commit, bytes), ...])."""
    import httpx2
    from huggingface_hub import HfApi, constants, set_client_factory
    from huggingface_hub.utils import _http

    fake = FakeHub(write_token=TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for the suite
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    set_client_factory(lambda: httpx2.Client(transport=fake.transport(), follow_redirects=True,
                                             event_hooks={"request": [_http.hf_request_event_hook]}))
    try:
        api = HfApi(endpoint=ENDPOINT, token=TOKEN)
        api.create_repo(REPO)
        versions = []
        for name in ("tiny-style-mlp", "tiny-style-all"):
            data = demo_loras[name].read_bytes()
            commit = api.upload_file(path_or_fileobj=data, path_in_repo=HUB_FILE, repo_id=REPO).oid
            versions.append((commit, data))
        assert fake.repos[REPO].refs["main"] == versions[1][0]
        yield fake, versions
    finally:
        set_client_factory(_http.default_client_factory)


def test_a_local_file_records_the_sha256_of_its_bytes(demo_loras, tmp_path):
    path = demo_loras["tiny-style-attn"]
    adapter = parse_adapter(path)
    assert adapter.provenance() == {"source": str(path), "sha256": sha256(path), "revision": None,
                                    "commit_hash": None}
    on_device = parse_adapter(path, device="cpu", dtype=adapter.layers[next(iter(adapter.layers))].A.dtype)
    assert on_device.sha256 == sha256(path) and on_device.to("cpu").sha256 == sha256(path)  # kept by copies
    folder = tmp_path / "trained"
    folder.mkdir()
    shutil.copy(demo_loras["tiny-style-mlp"], folder / "pytorch_lora_weights.safetensors")
    assert parse_adapter(folder).sha256 == sha256(demo_loras["tiny-style-mlp"])  # the folder's file
    tensors, metadata = load_safetensors(path)
    assert parse_state_dict(tensors, name="x", source="memory", metadata=metadata).sha256 is None  # no file


def test_a_hub_file_records_the_commit_it_resolved_to(hub, monkeypatch):
    from huggingface_hub import constants

    _, [(first, first_bytes), (head, head_bytes)] = hub
    latest = parse_adapter(f"{REPO}/{HUB_FILE}")
    assert latest.provenance() == {"source": f"{REPO}/{HUB_FILE}", "sha256": hashlib.sha256(head_bytes).hexdigest(),
                                   "revision": None, "commit_hash": head}
    pinned = parse_adapter(f"hf://{REPO}@{first}/{HUB_FILE}")
    assert (pinned.sha256, pinned.revision, pinned.commit_hash) == (hashlib.sha256(first_bytes).hexdigest(), first,
                                                                    first)
    on_main = parse_adapter(REPO, weight_name=HUB_FILE, revision="main")
    assert (on_main.revision, on_main.commit_hash) == ("main", head)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # from the cache: its refs name the commit
    assert parse_adapter(f"{REPO}/{HUB_FILE}").commit_hash == head

    import huggingface_hub

    real = huggingface_hub.hf_hub_download

    def no_dry_run(*args, dry_run=False, **kwargs):
        if dry_run:
            raise OSError("cache lookup failed")
        return real(*args, **kwargs)

    # the lookup failing (or naming another file): the snapshot folder the file was read from names the commit
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_dry_run)
    assert parse_adapter(f"{REPO}/{HUB_FILE}").commit_hash == head


def test_the_live_set_reports_what_was_parsed(served_tiny, demo_loras):
    attn, mlp = demo_loras["tiny-style-attn"], demo_loras["tiny-style-mlp"]
    served_tiny.set_loras([(str(attn), 0.8), (str(mlp), 0.5)])
    assert adapters_used(served_tiny) == [
        {"name": "tiny-style-attn", "scale": 0.8, "source": str(attn), "sha256": sha256(attn), "revision": None,
         "commit_hash": None},
        {"name": "tiny-style-mlp", "scale": 0.5, "source": str(mlp), "sha256": sha256(mlp), "revision": None,
         "commit_hash": None}]
    served_tiny.set_loras([(str(attn), 0.8), (str(mlp), 0.5)])  # the same set again, from the cache
    assert [a["sha256"] for a in adapters_used(served_tiny)] == [sha256(attn), sha256(mlp)]
    served_tiny.set_loras([])
    assert adapters_used(served_tiny) == []


def test_a_file_switch_does_not_wait_for_the_sha256(served_tiny, demo_loras, tmp_path, monkeypatch):
    """The digest is hashed on a background thread: a switch from a file (and the serve worker's record of it)
    returns while the hash is still held back; the provenance read afterwards waits for it and is exact."""
    import threading

    from aotpack.adapters import files

    release, hashing = threading.Event(), threading.Event()
    real = hashlib.sha256

    def held_back(data):
        hashing.set()
        assert release.wait(60)
        return real(data)

    monkeypatch.setattr(files.hashlib, "sha256", held_back)
    path = tmp_path / "fresh.safetensors"  # a new file: parsed, not taken from the adapter cache
    shutil.copy(demo_loras["tiny-style-attn"], path)
    try:
        switch = served_tiny.set_loras([(str(path), 0.8)])
        assert switch.parsed == 1 and hashing.is_set() and not release.is_set()  # done while the hash waits
        (adapter, _), = served_tiny.live_adapters()
        assert not adapter.digest.done() and adapter.provenance(wait=False)["sha256"] is adapter.digest
    finally:
        release.set()
    assert adapters_used(served_tiny)[0]["sha256"] == sha256(path)
    served_tiny.set_loras([])


def test_the_run_report_names_each_adapter_file_and_commit(hub, tiny_package, demo_loras, tmp_path):
    _, [_, (head, head_bytes)] = hub
    local = demo_loras["tiny-style-attn"]
    common = {"prompt": "a cat", "steps": 1, "height": 64, "width": 64, "max_sequence_length": 16}
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({**common, **job}) + "\n" for job in [
        {"loras": [[str(local), 0.8], [f"{REPO}/{HUB_FILE}", 0.5]], "out": str(tmp_path / "a.png")},
        {"loras": [[str(local), 1.0]], "seed": 2},
        {"seed": 3}]))
    report = tmp_path / "report.json"
    result = CliRunner().invoke(cli, ["run", str(tiny_package), "--requests", str(jobs), "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    local_file = {"source": str(local), "sha256": sha256(local), "revision": None, "commit_hash": None}
    hub_file = {"source": f"{REPO}/{HUB_FILE}", "sha256": hashlib.sha256(head_bytes).hexdigest(), "revision": None,
                "commit_hash": head}
    assert [job["adapters"] for job in data["jobs"]] == [
        [{"name": "tiny-style-attn", "scale": 0.8, **local_file}, {"name": "style", "scale": 0.5, **hub_file}],
        [{"name": "tiny-style-attn", "scale": 1.0, **local_file}],
        []]
    assert data["adapters"] == [{**local_file, "jobs": [1, 2]}, {**hub_file, "jobs": [1]}]


def test_the_http_answer_and_listing_carry_sha256_and_commit(hub, tiny_package, demo_loras, tmp_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from aotpack.serve.server import BackgroundServer, build_service
    from aotpack.serve.service import ServeOptions

    _, [_, (head, head_bytes)] = hub
    folder = tmp_path / "loras"
    folder.mkdir()
    local = shutil.copy(demo_loras["tiny-style-attn"], folder / "attn.safetensors")
    service = build_service(tiny_package, "tiny", adapter_dirs=[folder],
                            adapters=[f"hub=hf://{REPO}@main/{HUB_FILE}"],
                            options=ServeOptions(warm_up=False, prefetch=False))
    server = BackgroundServer(service)
    with server as url:
        server.wait_ready(timeout=300)
        listed = {a["name"]: a for a in httpx.get(f"{url}/v1/adapters", timeout=30).json()["data"]}
        assert [(listed[n]["sha256"], listed[n]["revision"], listed[n]["commit_hash"]) for n in ("attn", "hub")] \
            == [(None, None, None), (None, "main", None)]  # a listing reads no file: known once parsed
        answer = httpx.post(f"{url}/v1/images/generations", timeout=300, json={
            "prompt": "a cat", "size": "64x64", "steps": 1, "max_sequence_length": 16,
            "loras": [{"name": "attn", "scale": 0.8}, {"name": "hub"}]})
        assert answer.status_code == 200, answer.text
        local_file = {"sha256": sha256(local), "revision": None, "commit_hash": None}
        hub_file = {"sha256": hashlib.sha256(head_bytes).hexdigest(), "revision": "main", "commit_hash": head}
        assert answer.json()["adapters"] == [{"name": "attn", "scale": 0.8, **local_file},
                                             {"name": "hub", "scale": 1.0, **hub_file}]
        listed = {a["name"]: a for a in httpx.get(f"{url}/v1/adapters", timeout=30).json()["data"]}
        assert {k: listed["attn"][k] for k in local_file} == local_file
        assert {k: listed["hub"][k] for k in hub_file} == hub_file


def test_the_adapter_listing_does_not_wait_for_a_hash_still_running(tiny_package, demo_loras, monkeypatch):
    """GET /v1/adapters runs on the server's event loop: a sha256 still being hashed is null there, not waited
    for (every request would stall); the generation answers and POST wait for it."""
    import threading

    from aotpack.adapters import files
    from aotpack.adapters.cache import AdapterCache
    from aotpack.serve.service import Service

    release = threading.Event()
    real = hashlib.sha256
    monkeypatch.setattr(files.hashlib, "sha256", lambda data: (release.wait(60), real(data))[1])

    class Loaded:  # the worker's view of a loaded pipeline: its adapter cache
        def __init__(self):
            import torch

            self.device = torch.device("cpu")
            self.cache = AdapterCache(self.device, torch.float32)

    service = Service(tiny_package, loader=lambda: None)
    service.worker.served = Loaded()
    path = demo_loras["tiny-style-attn"]
    entry = service.registry.add("attn", str(path), trusted=True)
    try:
        service.worker.parsed(entry.source)  # as a registration parses it
        (listed,) = service.describe_adapters()
        assert listed["sha256"] is None and listed["cached"]
    finally:
        release.set()
    assert service.describe(entry)["sha256"] == sha256(path)
    (listed,) = service.describe_adapters()
    assert listed["sha256"] == sha256(path)


def test_a_job_starts_its_steps_while_the_sha256_is_still_hashed(served_tiny, demo_loras, tmp_path, monkeypatch):
    """`aotpack run` reports each adapter's sha256, but reads it after the image: had the job read it at the
    switch, its first step would wait for the background hash (~0.5 s for a rank-64 FLUX.1-dev LoRA)."""
    import threading

    from aotpack.adapters import files
    from aotpack.runtime.jobs import Request, run_request
    from aotpack.runtime.requests import PackageLimits, validate_request

    first_step, hashed, steps_while_hashing = threading.Event(), threading.Event(), []
    real = hashlib.sha256

    def held_back(data):
        first_step.wait(10)  # a job that waits for the hash before its steps lets this time out
        digest = real(data)
        hashed.set()
        return digest

    def step_starts(module, args, kwargs):
        steps_while_hashing.append(not hashed.is_set())
        first_step.set()

    monkeypatch.setattr(files.hashlib, "sha256", held_back)
    path = tmp_path / "fresh.safetensors"  # a new file: parsed, not taken from the adapter cache
    shutil.copy(demo_loras["tiny-style-mlp"], path)
    request = validate_request(Request(prompt="a cat", steps=1, height=64, width=64, max_sequence_length=16,
                                       loras=[(str(path), 0.7)]),
                               PackageLimits(image_tokens=(16, 4096), text_tokens=(8, 512)))
    hook = served_tiny.transformer.register_forward_pre_hook(step_starts, with_kwargs=True)
    try:
        result = run_request(served_tiny, request)
    finally:
        hook.remove()
        served_tiny.set_loras([])
    assert steps_while_hashing[:1] == [True]
    assert [(a["source"], a["sha256"]) for a in result.adapters] == [(str(path), sha256(path))]
