"""The rollout server's HTTP app in-process (health, generate, auth, limits, weight reload) and its sync helpers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub, even by accident

import asyncio
import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from model_factories import save_tiny_llama
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from rollout_server.app import create_app
from rollout_server.backends.base import WeightsTag
from rollout_server.backends.hf import HFBackend
from rollout_server.checkpoints import CheckpointError, read_checkpoint
from rollout_server.policy_weights import PolicyWeights
from services.config import RunConfig, load_config
from services.contracts import PolicyView, RunFolder
from services.protocol import Sampling

torch.set_num_threads(1)

TOKEN = "sekrit"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MESSAGES = [{"role": "user", "content": "What is 3 + 4?"}]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the default model's tokenizer and chat template."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    return save_tiny_llama(folder, intermediate_size=64, max_positions=256)


def _config(**overrides: object) -> RunConfig:
    base = [f"rollout.server.api_token={TOKEN}", "rollout.server.max_body_bytes=4096"]
    return load_config(None, base + [f"{k}={v}" for k, v in overrides.items()], environ={})


@pytest.fixture
def backend(tiny_model_dir: Path) -> HFBackend:
    return HFBackend(tiny_model_dir)


@pytest.fixture
def checkpoints(tmp_path: Path) -> Path:
    """The run's checkpoint folder: the only place /v1/weights/reload loads from."""
    folder = RunFolder(tmp_path / "run").checkpoints
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
async def client(backend: HFBackend, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(_config(run_dir=tmp_path / "run"), backend=backend)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rollout") as c:
            yield c


def _generate_body(**kw: object) -> dict:
    body: dict = {"messages": MESSAGES, "n": 3, "sampling": {"max_new_tokens": 6, "seed": 1}}
    body.update(kw)
    return body


async def test_health_reports_the_engine_and_the_version(client: httpx.AsyncClient) -> None:
    resp = await client.get("/health")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["ok"] is True and body["version"] == 0 and body["worker"] == "disabled"
    assert body["max_rows"] > 0 and body["rows"] == 0 and body["groups"] == 0


async def test_health_answers_while_generation_runs(client: httpx.AsyncClient, backend: HFBackend) -> None:
    long = Sampling(temperature=1.0, max_new_tokens=180, seed=0)  # within the tiny model's 256 positions
    future = backend.submit(backend.encode_prompts([MESSAGES])[0], 8, long)
    try:
        while backend.state().rows == 0 and not future.done():  # wait until the group is in the decode batch
            await asyncio.sleep(0.01)
        assert not future.done(), future.exception()  # a refused group fails here instead of hanging the loop
        resp = await client.get("/health")
        # answered from the engine's state while the 8 x 180-token group still decodes, not queued behind it
        assert resp.status_code == 200 and resp.json()["rows"] == 8 and resp.json()["groups"] == 1
        assert not future.done()
    finally:
        future.cancel()


async def test_generate_returns_n_completions_with_matching_logprobs(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/generate", json=_generate_body(), headers=AUTH)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["version"] == 0 and len(body["prompt_token_ids"]) > 5
    assert len(body["completions"]) == 3
    for c in body["completions"]:
        assert 1 <= len(c["token_ids"]) <= 6
        assert len(c["logprobs"]) == len(c["token_ids"])
        assert all(lp <= 0 for lp in c["logprobs"])
        assert c["finish_reason"] in ("stop", "length")
    again = await client.post("/v1/generate", json=_generate_body(), headers=AUTH)
    assert again.json()["completions"] == body["completions"]  # same seed, same weights: same samples
    text = await client.post("/v1/generate", json={"prompt": "Once upon a time", "n": 1}, headers=AUTH)
    assert text.status_code == 200 and len(text.json()["completions"]) == 1


@pytest.mark.parametrize(
    ("headers", "expected"), [({}, 401), ({"Authorization": "Bearer nope"}, 403), ({"Authorization": "Basic x"}, 401)]
)
async def test_mutating_endpoints_need_the_token(client: httpx.AsyncClient, headers: dict, expected: int) -> None:
    assert (await client.post("/v1/generate", json=_generate_body(), headers=headers)).status_code == expected
    reload = await client.post("/v1/weights/reload", json={"checkpoint": "/nowhere"}, headers=headers)
    assert reload.status_code == expected


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    body = _generate_body(messages=[{"role": "user", "content": "x" * 5000}])
    assert (await client.post("/v1/generate", json=body, headers=AUTH)).status_code == 413


@pytest.mark.parametrize(
    "change",
    [
        {"n": 0},
        {"n": 65},
        {"sampling": {"temperature": -1.0}},
        {"sampling": {"top_k": 0}},
        {"sampling": {"top_p": 1.5}},
        {"sampling": {"stop": [""]}},
        {"sampling": {"max_new_tokens": 4096}, "n": 64},  # n x max_new_tokens over the budget
        {"surprise": 1},
        {"prompt": "both kinds of prompt"},
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
    ],
)
async def test_bad_generate_parameters_are_422(client: httpx.AsyncClient, change: dict) -> None:
    resp = await client.post("/v1/generate", json=_generate_body(**change), headers=AUTH)
    assert resp.status_code == 422, resp.text


async def test_prompt_beyond_the_context_is_422(client: httpx.AsyncClient) -> None:
    body = _generate_body(n=1, sampling={"max_new_tokens": 300})  # the tiny model's context is 256
    assert (await client.post("/v1/generate", json=body, headers=AUTH)).status_code == 422


def _snapshot(backend: HFBackend) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backend.model.named_parameters()}


def _unchanged(backend: HFBackend, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in backend.model.named_parameters())


async def test_reload_loads_only_from_the_runs_checkpoint_folder(
    client: httpx.AsyncClient, backend: HFBackend, tiny_model_dir: Path, checkpoints: Path, tmp_path: Path
) -> None:
    before = _snapshot(backend)
    outside = tmp_path / "elsewhere" / "step-000001"  # a loadable checkpoint, but not this run's
    LlamaForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(outside)
    (checkpoints / "escape").symlink_to(outside)
    answers = set()
    for requested in (str(outside), "../../elsewhere/step-000001", "escape", str(checkpoints), "/etc",
                      str(checkpoints / "missing"), "missing"):  # fmt: skip
        resp = await client.post("/v1/weights/reload", json={"checkpoint": requested}, headers=AUTH)
        assert resp.status_code == 404, (requested, resp.text)
        answers.add(resp.json()["detail"].split("'")[0])
    assert answers == {"no checkpoint "}  # forbidden and missing answer alike
    assert _unchanged(backend, before)


async def test_reload_with_a_bad_folder_keeps_the_weights(
    client: httpx.AsyncClient, backend: HFBackend, checkpoints: Path
) -> None:
    before = _snapshot(backend)
    missing = await client.post("/v1/weights/reload", json={"checkpoint": str(checkpoints / "nope")}, headers=AUTH)
    assert missing.status_code == 404
    (checkpoints / "empty").mkdir()
    empty = await client.post("/v1/weights/reload", json={"checkpoint": str(checkpoints / "empty")}, headers=AUTH)
    assert empty.status_code == 422
    tmp_path = checkpoints
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    weights = {k: v.clone() for k, v in before.items()}
    weights["model.norm.weight"] = torch.ones(7)  # wrong shape, every other tensor fine
    save_file(weights, str(wrong / "model.safetensors"))
    resp = await client.post("/v1/weights/reload", json={"checkpoint": str(wrong)}, headers=AUTH)
    assert resp.status_code == 422 and "model.norm.weight" in resp.text
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert (await client.post("/v1/weights/reload", json={"checkpoint": str(corrupt)}, headers=AUTH)).status_code == 422
    assert _unchanged(backend, before)
    assert (await client.get("/health")).json()["version"] == 0


async def test_reload_with_a_good_checkpoint_changes_the_weights(
    client: httpx.AsyncClient, backend: HFBackend, tiny_model_dir: Path, checkpoints: Path
) -> None:
    tmp_path = checkpoints
    before = _snapshot(backend)
    first = (await client.post("/v1/generate", json=_generate_body(), headers=AUTH)).json()
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(tmp_path / "step-000003")
    resp = await client.post(
        "/v1/weights/reload", json={"checkpoint": str(tmp_path / "step-000003"), "version": 3}, headers=AUTH
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["version"] == 3 and resp.json()["tensors"] == len(before)
    assert not _unchanged(backend, before)
    assert torch.equal(backend.model.model.norm.weight, model.model.norm.weight)
    after = (await client.post("/v1/generate", json=_generate_body(), headers=AUTH)).json()
    assert after["version"] == 3
    assert after["completions"] != first["completions"]  # same seed, new weights
    assert (await client.get("/health")).json()["version"] == 3
    metrics = (await client.get("/metrics/")).text
    assert "dipo_rollout_policy_version 3.0" in metrics


# ------------------------------------------------------------------ sync helpers


def test_policy_view_reads_the_learner_hash() -> None:
    view = PolicyView.from_hash(
        {b"version": b"5", b"checkpoint": b"/ck/step-4", b"checkpoint_version": b"4", b"status": b"running",
         b"sync_endpoint": b"127.0.0.1:1234"}
    )  # fmt: skip
    assert view == PolicyView(5, "/ck/step-4", 4, "running", "127.0.0.1:1234")
    empty = PolicyView.from_hash({})
    assert empty == PolicyView(0, None, -1, "starting", None)
    assert PolicyView.from_hash({"checkpoint": "", "checkpoint_version": "-1"}).checkpoint is None


def test_read_checkpoint_wants_exactly_the_model_names(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4)}, str(tmp_path / "model-1.safetensors"))
    save_file({"c": torch.ones(1)}, str(tmp_path / "model-2.safetensors"))
    loaded = read_checkpoint(tmp_path, {"a": (2, 3), "b": (4,), "c": (1,)})
    assert sorted(loaded) == ["a", "b", "c"] and torch.equal(loaded["b"], torch.ones(4))
    with pytest.raises(CheckpointError, match="missing d"):
        read_checkpoint(tmp_path, {"a": (2, 3), "b": (4,), "c": (1,), "d": (1,)})
    with pytest.raises(CheckpointError, match="unknown c"):
        read_checkpoint(tmp_path, {"a": (2, 3), "b": (4,)})
    with pytest.raises(CheckpointError, match="shape"):
        read_checkpoint(tmp_path, {"a": (3, 2), "b": (4,), "c": (1,)})


def test_swaps_score_the_canary_and_notify_after(backend: HFBackend) -> None:
    weights = PolicyWeights(backend)
    heard: list[tuple[int, int]] = []
    weights.add_listener(lambda tag, canary: heard.append((tag.version, canary.version)))
    named = [(k, v.detach().clone()) for k, v in backend.model.named_parameters()]
    canary = weights.swap(named, WeightsTag(2, "v2:x"))
    assert weights.version == 2 and heard == [(2, 2)] and not weights.dirty
    assert canary.weights == "v2:x" and len(canary.logprobs) == len(weights.canary_ids) - 1
    assert weights.canary_fields("me", [2, 9]).keys() == {"me:2"}  # only versions it holds a scoring of
    with pytest.raises(ValueError):
        weights.swap([("no.such.weight", torch.zeros(1))], WeightsTag(3))
    assert weights.dirty and weights.version == 2 and heard == [(2, 2)]
    weights.swap(named, WeightsTag(4))  # a whole swap makes the weights whole again
    assert not weights.dirty


# ------------------------------------------------------------------ vLLM (only where it is installed)


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_backend_samples_with_logprobs_of_the_sampling_distribution(tiny_model_dir: Path) -> None:
    from rollout_server.backends.vllm import VLLMBackend

    vb = VLLMBackend(tiny_model_dir, dtype="float32")
    try:
        sampling = Sampling(temperature=0.7, max_new_tokens=8, seed=3)
        [group] = vb.generate([MESSAGES], 4, sampling)
        assert len(group.completions) == 4
        reference = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
        for c in group.completions:
            assert len(c.token_ids) == len(c.logprobs) >= 1
            ids = torch.tensor(np.concatenate([group.prompt_token_ids, c.token_ids]).astype(np.int64))[None]
            with torch.no_grad():
                logits = reference(ids).logits[0, len(group.prompt_token_ids) - 1 : -1].float()
            expected = (logits / 0.7).log_softmax(-1).gather(-1, ids[0, len(group.prompt_token_ids) :, None])
            np.testing.assert_allclose(c.logprobs, expected.squeeze(-1).numpy(), atol=2e-3)
        names = dict(vb.state_dict_names_and_shapes())
        shifted = [(k, v + 0.5) for k, v in reference.state_dict().items() if k in names]
        vb.swap(shifted, WeightsTag(1), [1, 2, 3]).result(120)
        [after] = vb.generate([MESSAGES], 4, sampling)
        assert [c.token_ids.tolist() for c in after.completions] != [c.token_ids.tolist() for c in group.completions]
    finally:
        vb.close()
