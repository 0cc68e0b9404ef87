"""Encrypted inference for a trained classifier: the server scores CKKS-encrypted features (TenSEAL).

    client = HEClient(dimension=576)                         # the client's CKKS keys: the secret key stays here
    context = load_public_context(client.public_context())    # the server's copy: no secret key (refused if any)
    scores = score_encrypted(context, weight, bias, client.encrypt_features(features))  # W x + b, encrypted
    client.decrypt(scores)                                    # the label scores (logits), only the client reads them
    he_predict(load_classifier("runs/rt"), ["A gorgeous, witty film."])   # both sides in one process, measured

What it protects, and what not: the client runs the backbone (the whole language model) on its own text
and sends only the encrypted feature vector (the hidden state the head reads); the server applies the
head `W x + b` to the ciphertext and returns encrypted label scores. The server never sees the text,
the features or the scores, and cannot decrypt them (it never holds the secret key). The client needs
the backbone's weights, so this hides nothing of the backbone from the client; nor the head: a client
that can query a linear head learns W and b from d + 1 answers, and it decrypts every slot of the result.

Parameters (CKKS, TenSEAL): polynomial degree 8192 (16384 for features wider than 4096 values), coefficient
moduli of 60, 40 and 60 bits, scale 2**40. The head needs one plaintext multiplication: the product is
rescaled by the 40-bit prime, the result lives under the 60-bit one (values up to 2**19 in magnitude,
far beyond any logit); the outer 60-bit prime is the key-switching prime the rotations need. 160 bits
of modulus at degree 8192 is within the 218 the HE standard allows for 128-bit security (SEAL enforces
it). The scale 2**40 keeps the error of a score near 1e-6 for d = 576 (measured: bench/he.py). Each
label's score is one `dot` (multiply, then a rotate-and-sum that needs Galois keys), so the answer is
one ciphertext per label. The Galois keys make the public context about 18 MB: a client registers it
with the server once (`/v1/classify/he/contexts`) and names it by id in each request.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lmforge.errors import UserError

COEFF_MOD_BIT_SIZES = (60, 40, 60)
SCALE_BITS = 40
DEGREES = (8192, 16384)  # the polynomial degrees a server accepts: 4096 or 8192 slots
MAX_CONTEXT_BYTES = 48 << 20  # a serialized public context (degree 8192: ~18 MB, 16384: ~38 MB)
MAX_CIPHERTEXT_BYTES = 1 << 20  # one encrypted feature vector (degree 8192: ~235 kB)


def _tenseal() -> Any:
    try:
        import tenseal
    except ImportError:
        raise UserError("encrypted inference needs TenSEAL: pip install 'lmforge[privacy]'") from None
    return tenseal


def degree_for(dimension: int) -> int:
    """The smallest accepted polynomial degree whose slots (degree / 2) hold `dimension` values."""
    for degree in DEGREES:
        if dimension <= degree // 2:
            return degree
    raise UserError(f"features of {dimension} values do not fit one CKKS ciphertext (at most {DEGREES[-1] // 2})")


# ----------------------------------------------------------------------------------------------
# the client: holds the secret key


class HEClient:
    """The client's CKKS context (with its secret key) for feature vectors of `dimension` values: encrypts
    features, decrypts label scores, and gives the public context (no secret key) for the server."""

    def __init__(self, dimension: int):
        ts = _tenseal()
        self.dimension = dimension
        self.context = ts.context(ts.SCHEME_TYPE.CKKS, degree_for(dimension),
                                  coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES))
        self.context.global_scale = 2.0 ** SCALE_BITS
        self.context.generate_galois_keys()  # the rotations of the sum in each dot product
        self._public: bytes | None = None

    def public_context(self) -> bytes:
        """The context the server needs: parameters and Galois keys; no secret key, nor the public key or
        relinearisation keys (the server neither encrypts nor multiplies ciphertexts)."""
        if self._public is None:
            public = self.context.copy()
            public.make_context_public()  # drops the secret key
            self._public = public.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=True,
                                            save_relin_keys=False)
        return self._public

    def encrypt_features(self, features: Sequence[float] | np.ndarray | torch.Tensor) -> bytes:
        """One feature vector (`dimension` values), encrypted and serialized."""
        values = torch.as_tensor(features).detach().double().cpu().reshape(-1)
        if values.numel() != self.dimension:
            raise UserError(f"features of {values.numel()} values; this client encrypts {self.dimension}")
        return _tenseal().ckks_vector(self.context, values.tolist()).serialize()

    def decrypt(self, scores: Sequence[bytes]) -> np.ndarray:
        """The label scores (logits, n_labels) from the server's encrypted answer (one ciphertext per label)."""
        ts = _tenseal()
        try:
            return np.array([ts.ckks_vector_from(self.context, s).decrypt()[0] for s in scores])
        except (ValueError, RuntimeError, TypeError, IndexError) as e:
            raise UserError(f"the server's answer is not a set of CKKS scores under this client's keys ({e})") from None


def softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max())
    return e / e.sum()


# ----------------------------------------------------------------------------------------------
# the server: a public context and the head


def load_public_context(data: bytes, dimension: int | None = None) -> Any:
    """The client's public context, checked: CKKS, an accepted degree (with slots for `dimension` features),
    a level to rescale into, Galois keys, a scale, and no secret key (refused: the server must never be
    able to decrypt)."""
    ts = _tenseal()
    import tenseal.sealapi  # noqa: F401  (registers SEAL's types, the moduli among them, with Python)

    if not data or len(data) > MAX_CONTEXT_BYTES:
        raise UserError(f"the context is {len(data):,} bytes; expected 1 to {MAX_CONTEXT_BYTES:,}")
    try:
        context = ts.context_from(data)
    except (ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"the context is not a serialized TenSEAL context ({e})") from None
    if context.has_secret_key() or context.is_private():
        raise UserError("the context carries its secret key; send the public one (HEClient.public_context()): "
                        "the server must not be able to decrypt")
    parms = context.seal_context().data.first_context_data().parms()
    if parms.scheme().name != "CKKS":
        raise UserError("the context is not CKKS (the head's scores are real numbers)")
    if parms.poly_modulus_degree() not in DEGREES:
        raise UserError(f"the context's polynomial degree is {parms.poly_modulus_degree()}; expected one of "
                        f"{', '.join(map(str, DEGREES))}")
    if dimension is not None and dimension > parms.poly_modulus_degree() // 2:
        raise UserError(f"the context's {parms.poly_modulus_degree() // 2} slots cannot hold the classifier's "
                        f"{dimension} features (make it with HEClient({dimension}))")
    if len(parms.coeff_modulus()) < 2:
        raise UserError("the context has no level left for the head's multiplication (give two or more data moduli)")
    if not context.has_galois_keys():
        raise UserError("the context has no Galois keys (the sums of the dot products rotate)")
    try:
        scale = context.global_scale
    except ValueError:
        raise UserError("the context has no global scale") from None
    if not 2.0 ** 20 <= scale <= 2.0 ** 60:
        raise UserError(f"the context's scale is 2^{np.log2(scale):.1f}; expected 2^20 to 2^60")
    return context


def head_weights(classifier: Any) -> tuple[np.ndarray, np.ndarray]:
    """The head of a classifier as float64 arrays: weight (n_labels, d), bias (n_labels,)."""
    head = classifier.head
    return head.weight.detach().double().cpu().numpy(), head.bias.detach().double().cpu().numpy()


def score_encrypted(context: Any, weight: np.ndarray, bias: np.ndarray, ciphertext: bytes) -> list[bytes]:
    """`W x + b` on the encrypted features `x` under a public `context`: one ciphertext per label, serialized."""
    ts = _tenseal()
    if not ciphertext or len(ciphertext) > MAX_CIPHERTEXT_BYTES:
        raise UserError(f"the encrypted features are {len(ciphertext):,} bytes; expected 1 to "
                        f"{MAX_CIPHERTEXT_BYTES:,}")
    try:
        vector = ts.ckks_vector_from(context, ciphertext)
    except (ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"the encrypted features are not a CKKS vector under the registered context ({e})") from None
    if vector.size() != weight.shape[1]:
        raise UserError(f"the encrypted features hold {vector.size()} values; the classifier reads {weight.shape[1]}")
    try:
        return [(vector.dot(w) + [b]).serialize() for w, b in zip(weight.tolist(), bias.tolist())]
    except (ValueError, RuntimeError) as e:
        raise UserError(f"cannot apply the head to these encrypted features ({e})") from None


def score_with(classifier: Any, context: Any, ciphertext: bytes) -> list[bytes]:
    """`score_encrypted` with a classifier's head (the server calls it on the model's thread)."""
    return score_encrypted(context, *head_weights(classifier), ciphertext)


class PublicContexts:
    """The public contexts clients registered, by random id, in memory: at most `per_owner` per API key (a new
    one drops that key's oldest) and `total` in all (then the least recently used goes). A context is found
    only by the key that registered it."""

    def __init__(self, per_owner: int = 2, total: int = 16):
        self.per_owner, self.total = per_owner, total
        self._lock = threading.Lock()
        self._contexts: OrderedDict[str, tuple[str | None, Any]] = OrderedDict()  # id -> (owner, context)

    def add(self, owner: str | None, context: Any) -> str:
        context_id = "hectx-" + secrets.token_hex(16)
        with self._lock:
            owned = [i for i, (o, _) in self._contexts.items() if o == owner]
            for old in owned[:max(0, len(owned) - self.per_owner + 1)]:
                del self._contexts[old]
            while len(self._contexts) >= self.total:
                self._contexts.popitem(last=False)
            self._contexts[context_id] = (owner, context)
        return context_id

    def get(self, owner: str | None, context_id: str) -> Any | None:
        with self._lock:
            found = self._contexts.get(context_id)
            if found is None or found[0] != owner:
                return None
            self._contexts.move_to_end(context_id)
            return found[1]

    def __len__(self) -> int:
        return len(self._contexts)


# ----------------------------------------------------------------------------------------------
# both sides in one process: the demonstration


def he_predict(classifier: Any, texts: Sequence[str], batch_size: int = 32,
               progress: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Predictions as `lmforge.tasks.classify.predict` gives them, computed through encryption: the features
    (on the client) once per batch, then per text encrypt, score on the server's public context, decrypt.
    Each prediction also has "he": bytes up and down, milliseconds of each side, and the largest
    |encrypted - plaintext| score. Returns (predictions, the run: context bytes and parameters).
    `classifier`: a Classifier (`lmforge.tasks.classify.load_classifier` loads one)."""
    empty = [i for i, t in enumerate(texts) if not str(t).strip()]
    if empty:
        raise UserError(f"text {empty[0] + 1} is empty; every text to classify needs some words")
    features = classifier.features(texts, batch_size, progress).double().cpu()
    weight, bias = head_weights(classifier)
    plain = features.numpy() @ weight.T + bias  # the plaintext scores, for the comparison
    client = HEClient(features.shape[1])
    public = client.public_context()
    server_context = load_public_context(public, weight.shape[1])  # what the server holds: no secret key
    predictions = []
    for row, reference in zip(features, plain):
        t0 = time.perf_counter()
        up = client.encrypt_features(row)
        t1 = time.perf_counter()
        down = score_encrypted(server_context, weight, bias, up)
        t2 = time.perf_counter()
        scores = client.decrypt(down)
        t3 = time.perf_counter()
        p = softmax(scores)
        predictions.append({
            "label": classifier.labels[int(p.argmax())],
            "probabilities": {label: round(float(v), 6) for label, v in zip(classifier.labels, p)},
            "he": {"bytes_up": len(up), "bytes_down": sum(map(len, down)), "ms_encrypt": round((t1 - t0) * 1e3, 2),
                   "ms_server": round((t2 - t1) * 1e3, 2), "ms_decrypt": round((t3 - t2) * 1e3, 2),
                   "max_abs_score_diff": float(np.abs(scores - reference).max()),
                   "plaintext_label": classifier.labels[int(reference.argmax())]}})
    run = {"context_bytes": len(public), "poly_modulus_degree": degree_for(features.shape[1]),
           "coeff_mod_bit_sizes": list(COEFF_MOD_BIT_SIZES), "scale_bits": SCALE_BITS,
           "server_has_secret_key": bool(server_context.has_secret_key())}
    return predictions, run
