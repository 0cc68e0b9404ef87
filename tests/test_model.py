"""Tests of lmforge.models: shapes, causality, the KV cache (with left padding), the fused loss and
its gradients, the tied head's state dict, and logit parity with transformers' GPT-2 and Llama."""

from __future__ import annotations

import inspect
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.decoder import Decoder, flops_per_token
from lmforge.models.layers import fused_linear_cross_entropy

STYLES = ["gpt2", "llama"]


def random_ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("style", STYLES)
def test_forward_shapes(make_model, style: str) -> None:
    model = make_model(style, vocab_size=101)
    config = model.config
    if style == "llama":
        assert config.n_kv_head < config.n_head  # grouped-query attention is what is being tested
        qkv = model.blocks[0].attn.qkv.weight
        assert qkv.shape == (config.d_model + 2 * config.n_kv_head * config.head_dim, config.d_model)
    ids = random_ids(3, 17, 101)
    targets = random_ids(3, 17, 101, seed=1)
    logits = model(ids)
    assert logits.shape == (3, 17, 101)
    assert torch.isfinite(logits).all()
    last = model(ids, last_only=True)
    assert last.shape == (3, 1, 101)
    torch.testing.assert_close(last[:, 0], logits[:, -1], atol=1e-5, rtol=0)
    loss = model(ids, targets)
    assert loss.shape == () and torch.isfinite(loss)
    # a random model is close to uniform over the vocabulary (on targets unrelated to the input)
    assert abs(loss.item() - torch.log(torch.tensor(101.0)).item()) < 0.5
    assert model.head_weight is model.tok_emb.weight  # tied embeddings


def test_untied_head_and_context_limit(make_model) -> None:
    model = make_model("llama", tie_embeddings=False)
    assert model.head is not None and model.head_weight is model.head.weight
    assert model.head_weight.data_ptr() != model.tok_emb.weight.data_ptr()
    block = model.config.block_size
    model(random_ids(1, block, 384))  # exactly the context is fine
    with pytest.raises(ValueError, match="exceeds the context"):
        model(random_ids(1, block + 1, 384))


@pytest.mark.parametrize("style", STYLES)
def test_causality(make_model, style: str) -> None:
    model = make_model(style)
    ids = random_ids(2, 20, 384)
    changed = ids.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 384
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-6, rtol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().amax() > 1e-3  # the change is seen from its position on


@pytest.mark.parametrize("style", STYLES)
def test_kv_cache_equals_full_recompute(make_model, style: str) -> None:
    model = make_model(style)
    ids = random_ids(2, 24, 384, seed=1)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        parts = [model(ids[:, :9], cache=cache)]  # prefill
        for t in range(9, 14):  # one token at a time
            parts.append(model(ids[:, t:t + 1], cache=cache))
        parts.append(model(ids[:, 14:24], cache=cache))  # a chunk after cached tokens
    assert cache.length == 24
    stepped = torch.cat(parts, dim=1)
    # one token at a time sums in another order than the whole sequence: equal up to rounding, which grows with
    # the logits (here <= 20 ulps of the largest; 256 allowed; a caching mistake moves them by a good part of it)
    torch.testing.assert_close(stepped, full, rtol=0, atol=256 * torch.finfo(full.dtype).eps * full.abs().max().item())


@pytest.mark.parametrize("style", STYLES)
def test_left_padded_batch_equals_rows_alone(make_model, style: str) -> None:
    model = make_model(style)
    rows = [random_ids(1, n, 384, seed=n)[0].tolist() for n in (5, 11, 8)]
    continuation = random_ids(3, 4, 384, seed=99)
    longest = max(len(r) for r in rows)
    pad = torch.tensor([longest - len(r) for r in rows])
    padded = torch.tensor([[7] * (longest - len(r)) + r for r in rows])  # pad id 7: any id must be masked
    with torch.no_grad():
        cache = model.new_cache(3, pad=pad)
        batched = [model(padded, cache=cache)]
        for t in range(4):
            batched.append(model(continuation[:, t:t + 1], cache=cache))
        for i, row in enumerate(rows):
            alone = model(torch.cat([torch.tensor([row]), continuation[i:i + 1]], dim=1))[0]
            got = torch.cat([batched[0][i, pad[i]:]] + [b[i] for b in batched[1:]])
            assert got.shape == alone.shape  # other shapes, other summation orders: equal up to rounding
            ulps = 256 * torch.finfo(alone.dtype).eps * alone.abs().max().item()
            torch.testing.assert_close(got, alone, rtol=0, atol=ulps, msg=f"row {i}")


@pytest.mark.parametrize("style", STYLES)
def test_fused_loss_and_gradients_equal_cross_entropy(make_model, style: str) -> None:
    model = make_model(style).train()
    ids = random_ids(3, 16, 384, seed=2)
    targets = random_ids(3, 16, 384, seed=3)
    targets[0, :5] = -100
    targets[2, 10:] = -100
    fused_model, reference_model = model, make_model(style)
    reference_model.load_state_dict(model.state_dict())
    loss = fused_model(ids, targets)
    (2.5 * loss).backward()  # the incoming gradient must scale the saved gradients
    logits = reference_model(ids)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    (2.5 * expected).backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    fused_grads = dict(fused_model.named_parameters())
    for name, p in reference_model.named_parameters():
        torch.testing.assert_close(fused_grads[name].grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_fused_loss_chunks_and_no_grad() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    t[::4] = -100
    loss = fused_linear_cross_entropy(h, w, t, chunk_size=8)  # chunks of 8 with a ragged last chunk
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    expected = F.cross_entropy(h2 @ w2.T, t, ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(h, w, t, chunk_size=5), expected.detach())


def test_fused_loss_frozen_head_keeps_no_weight_gradient() -> None:
    """LoRA's case: the head (the tied embedding) is frozen. The input gradient is the same as with a
    trained head, and nothing of the head's (V, d) size is kept for the backward pass."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(500, 16, generator=g)
    t = torch.randint(0, 500, (37,), generator=g)
    t[::3] = -100
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        loss = fused_linear_cross_entropy(h, w, t, chunk_size=8)
    assert saved and max(saved) == h.numel()  # the input's gradient only, not a (V, d) one
    loss.backward()
    h2 = h.detach().clone().requires_grad_()
    expected = F.cross_entropy(h2 @ w.T, t, ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(h.grad, h2.grad)
    # and a trained head on a frozen input: the weight's gradient alone
    w3 = w.clone().requires_grad_()
    fused_linear_cross_entropy(h.detach(), w3, t, chunk_size=8).backward()
    w4 = w.clone().requires_grad_()
    F.cross_entropy(h.detach() @ w4.T, t, ignore_index=-100).backward()
    torch.testing.assert_close(w3.grad, w4.grad)


@pytest.mark.parametrize("tied", [True, False])
def test_every_linear_layer_is_an_nn_linear_and_the_tied_head_is_saved_once(make_model, tied) -> None:
    """Plain PyTorch: the head is an nn.Linear too; tied, it holds the embedding's Parameter, which the
    state dict keeps once (as tok_emb.weight), and loading (with assign=True too, as lmforge.load does)
    ties it again."""
    model = make_model("llama", tie_embeddings=tied)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert (model.head.weight is model.tok_emb.weight) == tied
    state = model.state_dict()
    assert ("head.weight" in state) != tied
    with torch.device("meta"):
        loaded = Decoder(model.config)
    loaded.load_state_dict(state, assign=True)
    assert (loaded.head.weight is loaded.tok_emb.weight) == tied
    assert loaded.state_dict().keys() == state.keys() and loaded.num_parameters() == model.num_parameters()
    ids = random_ids(2, 9, 384)
    assert torch.equal(loaded(ids), model(ids))


def test_rope_attention_does_not_keep_the_whole_qkv_output(make_model) -> None:
    """With RoPE, q and k are new tensors; v is copied out so that the backward pass does not keep
    the whole q/k/v projection's output alive through a view of it."""
    model = make_model("llama", dropout=0.0).train()
    made = []
    hooks = [m.register_forward_hook(lambda m, i, out: made.append(weakref.ref(out)))
             for name, m in model.named_modules() if name.endswith("attn.qkv")]
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(6))
    loss = model(ids, ids)
    assert len(made) == model.config.n_layer and all(ref() is None for ref in made)
    loss.backward()
    for h in hooks:
        h.remove()


def test_flops_per_token_counts_the_model_matmuls(make_model) -> None:
    for style in STYLES:
        model = make_model(style, tie_embeddings=False)
        c = model.config
        matmul_weights = sum(p.numel() for n, p in model.named_parameters()
                             if p.dim() == 2 and not n.startswith(("tok_emb", "pos_emb")))
        assert flops_per_token(c, 16) == 6 * matmul_weights + 6 * c.n_layer * c.d_model * 16


# ----------------------------------------------------------------------------------------------
# parity with transformers


def test_gpt2_logits_match_transformers(gpt2_pair) -> None:
    hf, ours = gpt2_pair
    ids = random_ids(2, 48, hf.config.vocab_size, seed=5)  # the whole context
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
        assert expected.abs().max() > 1.0  # weights large enough that a wrong mapping would show
        assert (got - expected).abs().max() <= 1e-4
        # the fused loss equals transformers' shifted loss
        hf_loss = hf(ids, labels=ids).loss
        torch.testing.assert_close(ours(ids[:, :-1], ids[:, 1:]), hf_loss, atol=1e-5, rtol=1e-5)


def test_llama_logits_match_transformers(llama_pair) -> None:
    hf, ours = llama_pair
    assert ours.config.n_kv_head == 2 and ours.config.n_head == 4
    ids = random_ids(2, 40, hf.config.vocab_size, seed=6)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
        assert expected.abs().max() > 1.0
        assert (got - expected).abs().max() <= 1e-4
        hf_loss = hf(ids, labels=ids).loss
        torch.testing.assert_close(ours(ids[:, :-1], ids[:, 1:]), hf_loss, atol=1e-5, rtol=1e-5)


def test_llama_cache_matches_transformers_cache(llama_pair) -> None:
    """Incremental decoding (RoPE positions from the cache) agrees with transformers' own cache."""
    transformers = pytest.importorskip("transformers")
    hf, ours = llama_pair
    ids = random_ids(1, 20, hf.config.vocab_size, seed=7)
    # transformers renamed `past_key_values` to `cache`; the cache object is updated in place
    keyword = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    past = transformers.DynamicCache(config=hf.config)
    with torch.no_grad():
        hf_steps = [hf(ids[:, :12], use_cache=True, **{keyword: past}).logits]
        for t in range(12, 20):
            hf_steps.append(hf(ids[:, t:t + 1], use_cache=True, **{keyword: past}).logits)
        cache = ours.new_cache(1)
        our_steps = [ours(ids[:, :12], cache=cache)] + [ours(ids[:, t:t + 1], cache=cache) for t in range(12, 20)]
    assert (torch.cat(our_steps, 1) - torch.cat(hf_steps, 1)).abs().max() <= 1e-4


def test_decoder_state_dict_is_complete(gpt2_pair, llama_pair) -> None:
    """The parity mappings cover every tensor: nothing in the models is left at its own init."""
    for hf, ours in (gpt2_pair, llama_pair):
        hf_count = sum(p.numel() for p in hf.parameters())
        assert ours.num_parameters() == hf_count
        assert isinstance(ours, Decoder)
