"""Encrypted inference (lmforge.tasks.he, `classify predict --he`, /v1/classify/he): CKKS scores equal the
plaintext scores within 1e-3 on a real tiny classifier checkpoint; the server never holds a secret key;
hostile contexts and ciphertexts are refused with a 4xx."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
import torch
from server_util import running

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.recipes.classify import Classifier
from lmforge.server.app import create_app
from lmforge.server.keys import create_key
from lmforge.tasks.classify import load_classifier, predict
from lmforge.tasks.he import HEClient, PublicContexts, he_predict, head_weights, load_public_context, score_encrypted
from lmforge.train.checkpoint import save_checkpoint

pytest.importorskip("tenseal")

TEXTS = ["summer lovely fair", "death rough shade winds", "Shall I compare thee to a summer's day?",
         "the and of thy", "So long lives this, and this gives life to thee."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer, make_model):
    """A classifier checkpoint (tiny Llama-style backbone, three labels) whose head gives scores of a few
    units, so that labels differ between texts and the encrypted scores have something to get wrong."""
    backbone = make_model("llama", seed=3)
    backbone.tokenizer = tokenizer
    classifier = Classifier(backbone, ["fresh", "rotten", "mixed"])
    with torch.no_grad():
        torch.manual_seed(0)
        classifier.head.weight.normal_(std=1.0)
        classifier.head.bias.copy_(torch.tensor([0.5, -0.25, 0.1]))
    path = tmp_path_factory.mktemp("he") / "clf"
    save_checkpoint(path, classifier, tokenizer)
    return path


@pytest.fixture(scope="module")
def classifier(checkpoint):
    return load_classifier(checkpoint, "cpu")


@pytest.fixture(scope="module")
def client(classifier):
    return HEClient(classifier.head.in_features)


def test_encrypted_scores_equal_plaintext_scores_and_labels_agree(classifier):
    predictions, run = he_predict(classifier, TEXTS)
    plain = predict(classifier, TEXTS)
    features = classifier.features(TEXTS).double()
    scores = features @ classifier.head.weight.double().T + classifier.head.bias.double()
    assert scores.std() > 0.5 and len({p["label"] for p in plain}) > 1  # a head with something to get wrong
    assert [p["label"] for p in predictions] == [p["label"] for p in plain]
    for got, want in zip(predictions, plain):
        assert got["he"]["max_abs_score_diff"] <= 1e-3
        assert max(abs(got["probabilities"][k] - want["probabilities"][k]) for k in want["probabilities"]) <= 1e-3
        assert got["he"]["bytes_up"] > 100_000 and got["he"]["bytes_down"] > 3 * 50_000
    assert run["poly_modulus_degree"] == 8192 and run["server_has_secret_key"] is False


def test_the_public_context_has_no_secret_key_and_one_with_it_is_refused(client):
    server = load_public_context(client.public_context())
    assert not server.has_secret_key() and not server.is_private() and server.has_galois_keys()
    with pytest.raises(ValueError):  # the server's copy cannot decrypt
        import tenseal as ts
        ts.ckks_vector_from(server, client.encrypt_features(np.ones(client.dimension))).decrypt()
    with pytest.raises(UserError, match="secret key"):
        load_public_context(client.context.serialize(save_secret_key=True))
    for bad in (b"", b"not a context" * 10, client.public_context()[:5000]):
        with pytest.raises(UserError, match="context"):
            load_public_context(bad)


def test_malformed_ciphertexts_are_user_errors(classifier, client):
    context = load_public_context(client.public_context())
    weight, bias = head_weights(classifier)
    good = client.encrypt_features(np.ones(client.dimension))
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    other = HEClient(client.dimension * 2).encrypt_features(np.ones(client.dimension * 2))
    for bad, message in ((b"", "bytes"), (b"garbage" * 50, "not a CKKS vector"), (good[:1000], "CKKS"),
                         (other, f"hold {client.dimension * 2} values")):
        with pytest.raises(UserError, match=message):
            score_encrypted(context, weight, bias, bad)
    try:  # a changed byte: refused, or (coefficients still in range) scored to garbage; never another error
        assert len(score_encrypted(context, weight, bias, bytes(flipped))) == 3
    except UserError as e:
        assert "CKKS" in str(e)
    with pytest.raises(UserError, match="encrypts 32"):
        client.encrypt_features(np.ones(5))


def test_the_context_store_is_bounded_per_key_and_in_all():
    store = PublicContexts(per_owner=2, total=3)
    a1, a2, a3 = (store.add("alice", f"a{i}") for i in range(3))
    assert store.get("alice", a1) is None and store.get("alice", a3) == "a2"  # alice's oldest went
    assert store.get("bob", a3) is None  # only its own key finds a context
    b1 = store.add("bob", "b0")
    store.get("alice", a3)  # recently used: stays
    store.add("carol", "c0")  # four in all: the least recently used (alice's a2) goes
    assert store.get("alice", a2) is None and store.get("alice", a3) == "a2" and store.get("bob", b1) == "b0"
    assert len(store) == 3


def test_cli_predict_he_prints_plain_predictions_with_sizes_and_timings(checkpoint, classifier, capsys):
    capsys.readouterr()
    assert main(["classify", "predict", str(checkpoint), "--text", TEXTS[0], "--text", TEXTS[2], "--he"]) == 0
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines()]
    plain = predict(classifier, [TEXTS[0], TEXTS[2]])
    assert [line["label"] for line in lines] == [p["label"] for p in plain]
    assert all(line["he"]["max_abs_score_diff"] <= 1e-3 and line["he"]["ms_server"] > 0 for line in lines)
    assert "public context" in out.err and "no secret key" in out.err


def test_the_server_scores_encrypted_features_end_to_end(checkpoint, classifier, client, make_model, tokenizer,
                                                         tmp_path):
    keys = tmp_path / "keys.json"
    token = create_key(keys, "alice", ["classify"])
    other = create_key(keys, "bob", ["classify"])
    chat = create_key(keys, "carol", ["chat"])
    lm = make_model("llama")
    lm.tokenizer = tokenizer
    app = create_app({"clf": classifier, "tiny": lm}, keys=keys)
    public = base64.b64encode(client.public_context()).decode()
    features = classifier.features(TEXTS[:2]).double()
    expected = (features @ classifier.head.weight.double().T + classifier.head.bias.double()).detach().numpy()

    def post(path, body, key=token):
        return httpx.post(url + path, json=body, timeout=60, headers={"Authorization": f"Bearer {key}"} if key else {})

    with running(app) as url:
        registered = post("/v1/classify/he/contexts", {"model": "clf", "context": public})
        assert registered.status_code == 200, registered.text
        context_id = registered.json()["id"]
        assert registered.json()["model"] == "clf"
        model, held = app.state.he_contexts.get("alice", context_id)
        assert model == "clf"
        assert not held.has_secret_key() and not held.is_private()  # the server cannot decrypt
        for features_row, want in zip(features, expected):
            body = {"model": "clf", "context_id": context_id,
                    "input": base64.b64encode(client.encrypt_features(features_row)).decode()}
            answer = post("/v1/classify/he", body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["labels"] == ["fresh", "rotten", "mixed"]
            scores = client.decrypt([base64.b64decode(s) for s in answer.json()["scores"]])
            assert np.abs(scores - want).max() <= 1e-3
        # access: no key, a key without the scope, another key's context
        assert post("/v1/classify/he", body, key=None).status_code == 401
        assert post("/v1/classify/he/contexts", {"model": "clf", "context": public}, key=chat).status_code == 403
        assert post("/v1/classify/he", body, key=chat).status_code == 403
        assert post("/v1/classify/he", body, key=other).status_code == 404
        # hostile or malformed input: a clear 4xx with OpenAI's error object
        with_secret = base64.b64encode(client.context.serialize(save_secret_key=True)).decode()
        refused = post("/v1/classify/he/contexts", {"model": "clf", "context": with_secret})
        assert refused.status_code == 400 and "secret key" in refused.json()["error"]["message"]
        for bad, status, words in (({"input": "not base64!"}, 400, "base64"),
                                   ({"input": base64.b64encode(b"x" * 999).decode()}, 400, "CKKS"),
                                   ({"input": ""}, 400, "bytes"),
                                   ({"context_id": "hectx-nope"}, 404, "register"),
                                   ({"model": "tiny"}, 400, "classifier"),
                                   ({"model": "gone"}, 404, "not served")):
            answer = post("/v1/classify/he", {**body, **bad})
            assert answer.status_code == status and words in answer.json()["error"]["message"], answer.text
        for bad in ("%%%", base64.b64encode(b"garbage" * 100).decode(), ""):
            answer = post("/v1/classify/he/contexts", {"model": "clf", "context": bad})
            assert answer.status_code == 400 and answer.json()["error"]["param"] == "context", answer.text
        too_big = post("/v1/classify/he", {**body, "input": "A" * (1 << 21)})
        assert too_big.status_code == 413  # the 1 MiB limit of every route but the contexts'
