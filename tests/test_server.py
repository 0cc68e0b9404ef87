"""The HTTP server (lmforge.server): the official `openai` client against a served tiny model, continuous
batching (16 concurrent streams equal to each request alone), disconnects, limits, keys, errors."""

from __future__ import annotations

import base64
import copy
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from server_util import CHATML, running

from lmforge.server.app import create_app, render_chat
from lmforge.server.keys import create_key, revoke_key


@pytest.fixture(scope="module")
def new_lm(tokenizer, make_model):
    """Makes a tiny Llama-shaped decoder with a ChatML template (its tokens are plain text to this tokenizer),
    the same weights each time: each app gets its own (a served model's layers belong to its engine)."""

    def make():
        model = make_model("llama", block_size=256)
        model.tokenizer = copy.copy(tokenizer)
        model.tokenizer.chat_template = CHATML
        return model

    return make


@pytest.fixture(scope="module")
def lm(new_lm):
    return new_lm()


@pytest.fixture(scope="module")
def plain(tokenizer, make_model):
    """A tiny GPT-2-shaped decoder without a chat template (pretrained from scratch)."""
    model = make_model("gpt2", block_size=256, seed=1)
    model.tokenizer = tokenizer
    return model


@pytest.fixture(scope="module")
def classifier(tokenizer, make_model):
    from lmforge.recipes.classify import Classifier

    backbone = make_model("llama", seed=2)
    backbone.tokenizer = tokenizer
    torch.manual_seed(0)
    return Classifier(backbone, ["fresh", "rotten"]).eval()


@pytest.fixture(scope="module")
def server(lm, plain, classifier):
    app = create_app({"tiny": lm, "plain": plain, "clf": classifier})
    with running(app) as url:
        yield app, url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0)


def test_models_completion_and_chat_through_the_openai_client(server, client, lm, plain):
    assert sorted(m.id for m in client.models.list()) == ["clf", "plain", "tiny"]
    done = client.completions.create(model="plain", prompt="Shall I compare", max_tokens=12, temperature=0)
    assert done.choices[0].text == plain.generate("Shall I compare", max_new_tokens=12, temperature=0)[0]
    assert done.choices[0].finish_reason == "length"
    assert done.usage.prompt_tokens == len(plain.tokenizer.encode("Shall I compare"))
    assert done.usage.completion_tokens == 12
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Shall I compare thee?"}]
    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    prompt = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    alone = lm.generate(prompt, max_new_tokens=10, temperature=0, stop=["<|im_end|>"])[0]
    assert answer.choices[0].message.content == alone
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_streaming_chat_gives_the_same_text_in_chunks_and_a_usage_record(client):
    messages = [{"role": "user", "content": "And summer's lease"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # streamed, not sent at the end
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sampling_is_seeded_and_n_gives_distinct_choices(client):
    ask = dict(model="plain", prompt="Rough winds", max_tokens=8, temperature=1.0, seed=7, n=3)
    first, again = client.completions.create(**ask), client.completions.create(**ask)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) > 1


def test_stop_strings_end_the_text(client, plain):
    full = client.completions.create(model="plain", prompt="So long", max_tokens=20, temperature=0).choices[0].text
    stop = full[5:8]
    cut = client.completions.create(model="plain", prompt="So long", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_a_model_without_a_chat_template_chats_by_the_plain_template(client, plain):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}]
    prompt, stops = render_chat(plain.tokenizer, [(m["role"], m["content"]) for m in messages])
    assert prompt == "System: Be kind.\nUser: Hello\nAssistant:" and "\nUser:" in stops
    answer = client.chat.completions.create(model="plain", messages=messages, max_tokens=10, temperature=0)
    assert answer.choices[0].message.content == plain.generate(prompt, max_new_tokens=10, temperature=0,
                                                               stop=list(stops))[0]


def test_embeddings_are_normalised_mean_pooled_hidden_states(client, lm):
    got = client.embeddings.create(model="tiny", input=["Shall I compare thee", "to a summer's day"])
    ids = lm.tokenizer.encode("to a summer's day")
    with torch.no_grad():
        expected = torch.nn.functional.normalize(lm.hidden_states(torch.tensor([ids])).mean(1), dim=-1)[0]
    vector = np.asarray(got.data[1].embedding)  # the client asks for base64 and decodes it
    assert np.allclose(vector, expected.numpy(), atol=1e-5) and abs(np.linalg.norm(vector) - 1) < 1e-5
    floats = httpx.post(str(client.base_url) + "embeddings", json={"model": "tiny", "input": "to a summer's day",
                                                                     "encoding_format": "float"}).json()
    assert np.allclose(floats["data"][0]["embedding"], expected.numpy(), atol=1e-5)
    assert got.usage.prompt_tokens == len(ids) + len(lm.tokenizer.encode("Shall I compare thee"))


def test_classify_answers_labels_and_probabilities(server, classifier):
    from lmforge.tasks.classify import predict

    texts = ["A gorgeous, witty film.", "Dull."]
    got = httpx.post(server[1] + "/v1/classify", json={"model": "clf", "input": texts}).json()
    expected = predict(classifier, texts)
    assert [d["label"] for d in got["data"]] == [e["label"] for e in expected]
    for d, e in zip(got["data"], expected):
        assert d["probabilities"] == pytest.approx(e["probabilities"], abs=1e-5)
    wrong = httpx.post(server[1] + "/v1/chat/completions", json={"model": "clf", "messages": [
        {"role": "user", "content": "hi"}]})
    assert wrong.status_code == 400 and "classifier" in wrong.json()["error"]["message"]


def test_client_errors_map_to_the_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="x", max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="stop"):
        client.completions.create(model="tiny", prompt="x", stop=["a", "b", "c", "d", "e"])
    with pytest.raises(openai.UnprocessableEntityError, match="n"):
        client.completions.create(model="tiny", prompt="x", n=100)
    with pytest.raises(openai.BadRequestError, match="classif|embeddings|lm"):
        client.embeddings.create(model="clf", input="x")
    with pytest.raises(openai.BadRequestError, match="reads at most"):
        client.embeddings.create(model="tiny", input=["fine", "x " * 300])


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),                                          # malformed JSON
    (json.dumps({"model": "tiny", "prompt": 3}).encode(), 422),  # a field of the wrong type
    (json.dumps({"model": "tiny"}).encode(), 422),               # a missing field
    (json.dumps({"model": "tiny", "prompt": "x" * 5000}).encode(), 400),  # longer than the context
    (b"[" * 100_000, 400),                                       # deeply nested
    (b"x" * (2 << 20), 413),                                     # too large
])
def test_bad_requests_get_an_error_object_never_a_500(server, body, status):
    r = httpx.post(server[1] + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_routes_and_methods_get_error_objects(server):
    assert httpx.get(server[1] + "/v2/nothing").json()["error"]["type"] == "not_found_error"
    r = httpx.get(server[1] + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def _stream_text(url: str, body: dict) -> str:
    pieces = []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces += [c["text"] for c in json.loads(line[6:])["choices"]]
    return "".join(pieces)


def test_sixteen_concurrent_streams_each_equal_the_request_alone(server):
    app, url = server
    prompts = [f"{word} " * (1 + i % 5) for i, word in enumerate(
        "Shall compare thee summer day lovely temperate Rough winds shake darling buds May lease short date".split())]
    bodies = [{"model": "tiny", "prompt": p, "max_tokens": 5 + 3 * (i % 7), "temperature": 0}
              for i, p in enumerate(prompts)]
    alone = [_stream_text(url, b) for b in bodies]
    together: list[str | None] = [None] * len(bodies)
    widest = [0]

    def watch():  # the batch really holds several rows at once
        while any(t is None for t in together):
            widest[0] = max(widest[0], app.state.served["tiny"].engine.active)
            time.sleep(0.001)

    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, _stream_text(url, bodies[i])))
               for i in range(len(bodies))]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    watcher.join(5)
    assert together == alone
    assert widest[0] > 4


def test_a_client_that_disconnects_frees_its_row(new_lm):
    model = new_lm()
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.01))  # 200 steps: at least 2 s
    app = create_app({"tiny": model})
    engine = app.state.served["tiny"].engine
    with running(app) as url:
        body = {"model": "tiny", "prompt": "Shall", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            next(r.iter_lines())
            assert engine.active == 1
        left = time.perf_counter()
        while engine.active and time.perf_counter() - left < 5:
            time.sleep(0.005)
        assert engine.active == 0 and time.perf_counter() - left < 1.0  # long before its 200 tokens


def test_a_full_queue_answers_503_with_retry_after(new_lm):
    app = create_app({"tiny": new_lm()}, max_batch=1, max_queue=0)
    engine, release = app.state.served["tiny"].engine, threading.Event()
    engine.call(lambda model: release.wait(30))  # the engine is busy: the next request waits in the queue
    with running(app) as url:
        body = {"model": "tiny", "prompt": "Shall", "max_tokens": 3}
        first = threading.Thread(target=lambda: results.append(httpx.post(url + "/v1/completions", json=body)))
        results: list[httpx.Response] = []
        first.start()
        while engine.queue_depth == 0:
            time.sleep(0.005)
        busy = httpx.post(url + "/v1/completions", json=body)
        release.set()
        first.join(30)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["type"] == "overloaded_error"
    assert results[0].status_code == 200  # the one that waited is answered


def test_metrics_count_requests_tokens_and_latency(server, client):
    client.completions.create(model="plain", prompt="Shall", max_tokens=3, temperature=0)
    text = httpx.get(server[1] + "/metrics").text
    assert 'lmforge_requests_total{route="/v1/completions",status="200"}' in text
    assert 'lmforge_completion_tokens_total{model="plain"}' in text
    assert "lmforge_time_to_first_token_seconds_bucket" in text and 'lmforge_queue_depth{model="tiny"} 0.0' in text
    assert "lmforge_active_streams 0.0" in text


# ----------------------------------------------------------------------------------------------
# access control


@pytest.fixture(scope="module")
def guarded(new_lm, tokenizer, make_model, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    tokens = {
        "admin": create_key(keys, "ops", ["admin"]),
        "chat": create_key(keys, "alice", ["chat"], models=["tiny"]),
        "limited": create_key(keys, "bob", ["completions"], rpm=2),
        "tokens": create_key(keys, "carol", ["completions"], tpm=20),
    }
    audit = keys.parent / "audit.jsonl"
    from lmforge.recipes.classify import Classifier

    backbone = make_model("llama", seed=2)
    backbone.tokenizer = tokenizer
    app = create_app({"tiny": new_lm(), "clf": Classifier(backbone, ["fresh", "rotten"]).eval()}, keys=keys,
                     audit_log_file=audit)
    app.state.access.store.check_every = 0  # see every change of the file at once
    with running(app) as url:
        yield url, keys, tokens, audit


def _get(url, path, token=None):
    return httpx.get(url + path, headers={"Authorization": f"Bearer {token}"} if token else {})


def test_every_route_but_health_needs_a_key(guarded):
    url, _, tokens, _ = guarded
    assert _get(url, "/health").status_code == 200
    for path in ("/v1/models", "/metrics", "/openapi.json"):
        assert _get(url, path).status_code == 401, path
        assert _get(url, path, "lmf-00000000-wrong").status_code == 401, path
    for route, body in [("/v1/completions", {"model": "tiny", "prompt": "x"}),
                        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}),
                        ("/v1/embeddings", {"model": "tiny", "input": "x"}),
                        ("/v1/classify", {"model": "clf", "input": "x"})]:
        r = httpx.post(url + route, json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", route
    assert _get(url, "/metrics", tokens["admin"]).status_code == 200
    assert _get(url, "/openapi.json", tokens["chat"]).json()["paths"]["/v1/chat/completions"]


def test_scopes_and_models_of_a_key(guarded):
    url, _, tokens, _ = guarded
    chat = openai.OpenAI(base_url=url + "/v1", api_key=tokens["chat"], max_retries=0)
    assert [m.id for m in chat.models.list()] == ["tiny"]
    assert chat.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    with pytest.raises(openai.PermissionDeniedError, match="scope"):
        chat.completions.create(model="tiny", prompt="hi", max_tokens=3)
    with pytest.raises(openai.PermissionDeniedError, match="scope"):
        chat.embeddings.create(model="tiny", input="hi")
    assert _get(url, "/metrics", tokens["chat"]).status_code == 403
    admin = openai.OpenAI(base_url=url + "/v1", api_key=tokens["admin"], max_retries=0)
    assert admin.embeddings.create(model="tiny", input="hi").data  # admin: every scope
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key=tokens["chat"][:-2] + "xx", max_retries=0).models.list()


def test_rate_limits_answer_429_with_retry_after(guarded):
    url, _, tokens, _ = guarded
    ask = {"model": "tiny", "prompt": "Shall", "max_tokens": 2}
    headers = {"Authorization": f"Bearer {tokens['limited']}"}
    assert [httpx.post(url + "/v1/completions", json=ask, headers=headers).status_code for _ in range(2)] == [200] * 2
    third = httpx.post(url + "/v1/completions", json=ask, headers=headers)
    assert third.status_code == 429 and 1 <= int(third.headers["retry-after"]) <= 60
    headers = {"Authorization": f"Bearer {tokens['tokens']}"}
    assert httpx.post(url + "/v1/completions", json={**ask, "max_tokens": 20}, headers=headers).status_code == 200
    assert httpx.post(url + "/v1/completions", json=ask, headers=headers).status_code == 429  # 20+ tokens used


def test_keys_created_and_revoked_take_effect_without_a_restart(guarded):
    url, keys, _, _ = guarded
    token = create_key(keys, "dave", ["chat"])
    assert _get(url, "/v1/models", token).status_code == 200
    revoke_key(keys, "dave")
    assert _get(url, "/v1/models", token).status_code == 401


def test_the_audit_log_records_names_and_counts_never_keys_or_text(guarded):
    url, _, tokens, audit = guarded
    secret_prompt = "my PIN is 4 8 1 9"
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "max_tokens": 4, "messages": [
        {"role": "user", "content": secret_prompt}]}, headers={"Authorization": f"Bearer {tokens['chat']}"})
    assert r.status_code == 200
    expected = {"key": "alice", "route": "/v1/chat/completions", "status": 200, "model": "tiny",
                "prompt_tokens": r.json()["usage"]["prompt_tokens"],
                "completion_tokens": r.json()["usage"]["completion_tokens"]}
    deadline = time.time() + 5  # the record is written once the response has gone out
    while not any(expected.items() <= json.loads(line).items() for line in audit.read_text().splitlines()):
        assert time.time() < deadline, audit.read_text()
        time.sleep(0.01)
    text = audit.read_text()
    assert secret_prompt not in text and all(token not in text for token in tokens.values())
    assert not any(token.split("-", 2)[2] in text for token in tokens.values())  # lmf-ID-SECRET; a secret may hold "-"


def test_binding_beyond_loopback_without_keys_is_refused(tmp_path):
    run = subprocess.run([sys.executable, "-m", "lmforge", "serve", "gpt2", "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--keys" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_openai_base64_embeddings_decode_to_the_float_vectors(server):
    url = server[1]
    as_floats = httpx.post(url + "/v1/embeddings", json={"model": "tiny", "input": "Shall I"}).json()
    as_b64 = httpx.post(url + "/v1/embeddings", json={"model": "tiny", "input": "Shall I",
                                                      "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(as_b64["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, as_floats["data"][0]["embedding"], atol=1e-7)


def test_the_chat_page_is_served_without_a_key(guarded):
    page = httpx.get(guarded[0] + "/")
    assert page.status_code == 200 and page.text.lower().startswith("<!doctype html")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)  # nothing fetched from elsewhere


def test_served_package_data_includes_the_page():
    assert (Path(__import__("lmforge.server.app").server.app.__file__).parent / "static" / "chat.html").is_file()
