"""The HTTP server: OpenAI's API over lmforge models, with access control, metrics and an audit log.

    app = create_app({"chat": model}, keys="keys.json")     # a FastAPI application (tests, embedding)
    serve(["runs/chat", "clf=runs/rt"], keys="keys.json")   # `lmforge serve`: load the models, run uvicorn

Routes (every one but /health and the chat page / needs `Authorization: Bearer KEY` when keys are on):

    GET  /v1/models               the served models                           any key
    POST /v1/completions          text completion, SSE streaming               scope completions
    POST /v1/chat/completions     chat by the tokenizer's template, streaming  scope chat
    POST /v1/embeddings           mean-pooled, normalised hidden states        scope embeddings
    POST /v1/classify             a classifier checkpoint's labels, probabilities  scope classify
    POST /v1/classify/he/contexts register a CKKS public context (no secret key)  scope classify
    POST /v1/classify/he          a classifier's head on CKKS-encrypted features  scope classify
    GET  /metrics                 Prometheus text                              scope admin
    GET  /openapi.json            the schema of all of the above               any key
    GET  /health                  liveness, no key
    GET  /                        the web chat page (its API calls send the key typed into it)

Errors are OpenAI's error object (`{"error": {"message", "type", "param", "code"}}`) with 400 (bad
values, malformed JSON), 401 (no or wrong key), 403 (a scope or model the key lacks), 404 (unknown model
or route), 413 (body too large), 422 (a field of the wrong type), 429 and 503 (with Retry-After): a
client's mistake is never a 500 or a dropped connection. Generation goes through one `Engine` per
model (`lmforge.server.engine`: continuous batching); a client that disconnects frees its row at once.
The audit log (logger `lmforge.server.audit`, and `--audit-log FILE` as JSON lines) records key name,
route, status, model and token counts: never a key or any text of a request.

A model without a chat template (one pretrained from scratch) chats by a plain fallback template:
"System: ...\\nUser: ...\\nAssistant:" (each message on its own line, roles capitalised), and its answer
ends where it starts a new "\\nUser:" line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import UserError
from lmforge.server.engine import Engine, Event, QueueFull, Sampling
from lmforge.server.keys import Key, KeyStore, RateLimiter
from lmforge.tasks.he import MAX_CONTEXT_BYTES, PublicContexts, load_public_context, score_with

log = logging.getLogger("lmforge.server")
disable_created_metrics()  # no *_created series: one series per counter, as vLLM's /metrics
audit_log = logging.getLogger("lmforge.server.audit")

MAX_BODY_BYTES = 1 << 20  # a request body larger than this: 413
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_N = 8  # choices per request
MAX_INPUTS = 64  # texts per embeddings / classify request
HE_CONTEXTS_PATH = "/v1/classify/he/contexts"  # its body (a public context with Galois keys) may be larger
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens of /v1/completions
CHAT_MAX_TOKENS = 1024  # a chat answer's default limit (less where the context ends sooner)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")  # the tokens that end a chat answer
FALLBACK_STOPS = ("\nUser:", "\nSystem:")
PAGE = Path(__file__).parent / "static" / "chat.html"


# ----------------------------------------------------------------------------------------------
# request and response models (the OpenAPI schema is made of these)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields lmforge does not use (user, logit_bias ...)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampled(_Request):
    model: str = Field(description="a served model's id (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="the most new tokens per choice")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings that end the text")
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    seed: int | None = Field(None, description="the same seed and request give the same text")
    stream: bool = Field(False, description="Server-Sent Events, OpenAI's chunk format, then `data: [DONE]`")
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampled):
    prompt: str | list[str] = Field(description="a text, or a list of texts (each gets n choices)")


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")


class EmbeddingRequest(_Request):
    model: str
    input: str | list[str] = Field(description=f"a text or up to {MAX_INPUTS} texts")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32 bytes")


class ClassifyRequest(_Request):
    model: str
    input: str | list[str] = Field(description=f"a text or up to {MAX_INPUTS} texts")


class HEContextRequest(_Request):
    model: str = Field(description="the classifier the context is for (its features must fit the slots)")
    context: str = Field(description="base64 of a TenSEAL CKKS public context: Galois keys, no secret key "
                                     "(lmforge.tasks.he.HEClient.public_context())")


class HEContext(BaseModel):
    object: Literal["classify.he.context"] = "classify.he.context"
    id: str = Field(description="name it as context_id in /v1/classify/he; only this key finds it")
    model: str
    bytes: int


class HEClassifyRequest(_Request):
    model: str
    context_id: str = Field(description="a context registered for this model with /v1/classify/he/contexts by "
                                        "this key")
    input: str = Field(description="base64 of the CKKS-encrypted feature vector (HEClient.encrypt_features)")


class HEClassifyResponse(BaseModel):
    object: Literal["classify.he"] = "classify.he"
    model: str
    labels: list[str]
    scores: list[str] = Field(description="base64 of one encrypted score (logit) per label, in labels order "
                                          "(HEClient.decrypt)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class _Reply(BaseModel):
    """What every generation response has: its id, creation time (Unix seconds) and model."""

    id: str
    created: int
    model: str


class Completion(_Reply):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(_Reply):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(_Reply):
    """One Server-Sent Event of a streamed chat (`data: {chunk}`); the last one with a finish_reason
    carries the usage too, and with `stream_options.include_usage` one more chunk without choices does."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a list of floats, or base64 of their float32 bytes


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class Classification(BaseModel):
    index: int
    label: str
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Classification]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmforge"
    kind: Literal["lm", "seq2seq", "vae", "classifier"]
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    models: int


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 422, 429, 503)}
STREAM = {"text/event-stream": {"schema": {"type": "string", "description": "data: {chunk}\\n\\n ... data: [DONE]"}}}


class ApiError(Exception):
    """An error answered as OpenAI's error object with `status` (and `headers`, e.g. Retry-After)."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
             429: "rate_limit_error", 503: "overloaded_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ----------------------------------------------------------------------------------------------
# the served models


@dataclass
class Served:
    """One served model: its id, kind, the model (or classifier) and what runs it."""

    name: str
    kind: str  # lm, seq2seq, vae or classifier
    model: Any
    engine: Engine | None = None  # generation (and embeddings) of an LM, seq2seq or VAE
    worker: ThreadPoolExecutor | None = None  # a classifier's one thread
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def context(self) -> int:
        return self.model.config.block_size

    def run(self, function: Callable, *args: Any) -> asyncio.Future:
        """`function(model, *args)` on the model's own thread, awaitable."""
        future = self.engine.call(function, *args) if self.engine else self.worker.submit(function, self.model, *args)
        return asyncio.wrap_future(future)


def model_kind(model: Any) -> str:
    if hasattr(model, "labels") and hasattr(model, "probabilities"):
        return "classifier"
    name = type(model).__name__.lower()
    return "seq2seq" if "seq2seq" in name else "vae" if "vae" in name else "lm"


def embed(model: Any, ids: list[list[int]]) -> list[list[float]]:
    """Mean-pooled, L2-normalised final hidden states of each token sequence (a decoder's `hidden_states`)."""
    from lmforge.infer import pad_right

    tokens, mask = pad_right(ids, 0, next(model.parameters()).device)
    hidden = model.hidden_states(tokens).float()  # (B, T, d): causal, so right padding changes nothing before it
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return F.normalize(pooled, dim=-1).tolist()


def classify(classifier: Any, texts: list[str]) -> list[list[float]]:
    return classifier.probabilities(texts, 16, False).tolist()


# ----------------------------------------------------------------------------------------------
# access: keys, scopes, rate limits


class Access:
    """Who may call what: the keys file (None: everyone) and each key's requests and tokens per minute.

    The key is checked (`authenticate`, by the `Guard` middleware) before a request's body is read, on
    every path but OPEN; the routes check its scopes and models (`check`).
    """

    OPEN = ("/health", "/")  # liveness, and the chat page (whose API calls send the key typed into it)

    def __init__(self, keys: str | Path | None):
        self.store = KeyStore(keys) if keys is not None else None
        self.limiter = RateLimiter()

    def authenticate(self, path: str, headers: list[tuple[bytes, bytes]]) -> Key | None:
        """The caller's key (None: no keys, or an open path), or an ApiError: 401 without a valid key, 429
        past the key's rate limit."""
        if self.store is None or path in self.OPEN:
            return None
        header = dict(headers).get(b"authorization", b"").decode("latin-1")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        key = self.store.authenticate(token) if token else None
        if key is None:
            raise ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'"
                           if not token else "invalid, revoked or expired API key", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        retry = self.limiter.admit(key)
        if retry is not None:
            raise ApiError(429, f"key '{key.name}' is past its rate limit ({key.rpm or '-'} requests, "
                           f"{key.tpm or '-'} tokens per minute)", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, int(retry + 0.999)))})
        return key

    @staticmethod
    def check(request: Request, scope: str | None = None, model: str | None = None) -> Key | None:
        """The caller's key, or an ApiError 403 when it lacks the `scope` or may not use the `model`."""
        key = request.state.key
        if key is None:
            return None
        if scope is not None and not key.allows_scope(scope):
            raise ApiError(403, f"key '{key.name}' lacks the scope '{scope}'", code="insufficient_scope")
        if model is not None and not key.allows_model(model):
            raise ApiError(403, f"key '{key.name}' may not use model '{model}'", param="model",
                           code="model_not_allowed")
        return key


# ----------------------------------------------------------------------------------------------
# metrics


class Metrics:
    """The Prometheus series of one app (its own registry, so several apps can live in one process)."""

    def __init__(self, served: dict[str, Served]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens read", ["model"], registry=r)
        self.completion_tokens = Counter("lmforge_completion_tokens", "tokens generated", ["model"], registry=r)
        self.latency = Histogram("lmforge_request_seconds", "time from request to last byte", ["route"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.first_token = Histogram("lmforge_time_to_first_token_seconds", "time from request to first token",
                                     ["model"], registry=r, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.streams = Gauge("lmforge_active_streams", "streaming responses open now", registry=r)
        queue = Gauge("lmforge_queue_depth", "requests waiting to join the batch", ["model"], registry=r)
        rows = Gauge("lmforge_batch_rows", "sequences generating now", ["model"], registry=r)
        for s in served.values():
            if s.engine is not None:
                queue.labels(s.name).set_function(lambda e=s.engine: e.queue_depth)
                rows.labels(s.name).set_function(lambda e=s.engine: e.active)


# ----------------------------------------------------------------------------------------------
# the middleware: body size, audit log, request metrics


class Guard:
    """Pure ASGI middleware: the key is checked (401, 429) and a body over `max_body` bytes answered 413
    before the app sees the request; every request leaves one audit record and its metrics when its
    response is done (streams included)."""

    def __init__(self, app: Any, access: Access, metrics: Metrics, max_body: int, audit_file: Path | None,
                 body_limits: dict[str, int] | None = None):
        self.app, self.access, self.metrics, self.max_body = app, access, metrics, max_body
        self.audit_file, self.body_limits = audit_file, body_limits or {}  # {path: its larger limit}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]
        scope.setdefault("state", {})

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            try:
                scope["state"]["key"] = self.access.authenticate(scope["path"], scope["headers"])
                limit = self.body_limits.get(scope["path"], self.max_body)
                body = await self._read_body(scope, receive, limit)
                if body is None:
                    raise ApiError(413, f"request body larger than {limit:,} bytes")
            except ApiError as e:
                await e.response()(scope, receive, send_status)
                return
            await self.app(scope, _replay(body, receive), send_status)
        finally:
            self._record(scope, status[0], time.perf_counter() - started)

    async def _read_body(self, scope: dict, receive: Callable, limit: int) -> bytes | None:
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _record(self, scope: dict, status: int, seconds: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(path, str(status)).inc()
        self.metrics.latency.labels(path).observe(seconds)
        state = scope["state"]
        key = state.get("key")
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "key": key.name if key else None,
                  "method": scope["method"], "route": path, "status": status, "model": state.get("model"),
                  "prompt_tokens": state.get("prompt_tokens", 0),
                  "completion_tokens": state.get("completion_tokens", 0), "seconds": round(seconds, 4)}
        audit_log.info(json.dumps(record))
        if self.audit_file is not None:
            with self.audit_file.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _replay(body: bytes, receive: Callable) -> Callable:
    """A `receive` that gives the body read already, then passes on to the client's (disconnects)."""
    sent = [False]

    async def replayed() -> dict:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


# ----------------------------------------------------------------------------------------------
# the application


def create_app(models: dict[str, Any], keys: str | Path | None = None, max_batch: int = 16, max_queue: int = 64,
               max_body: int = MAX_BODY_BYTES, audit_log_file: str | Path | None = None) -> FastAPI:
    """A FastAPI application serving `models` ({id: a model `lmforge.load` made, or a classifier}).

    `keys`: a keys file (`lmforge keys create`); None serves without keys. `max_batch` sequences generate
    at once per model; up to `max_queue` more wait, beyond that requests get 503 with Retry-After.
    """
    served: dict[str, Served] = {}
    for name, model in models.items():
        kind = model_kind(model)
        s = Served(name, kind, model)
        if kind == "classifier":
            s.worker = ThreadPoolExecutor(1, thread_name_prefix=f"lmforge-{name}")
        else:
            s.engine = Engine(model, max_batch=max_batch, max_queue=max_queue)
        served[name] = s
    access = Access(keys)
    metrics = Metrics(served)
    app = FastAPI(title="lmforge", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None,
                  description="OpenAI-compatible API over lmforge models (lmforge.server.app).")
    app.state.served, app.state.access = served, access
    app.state.he_contexts = he_contexts = PublicContexts()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = loc[0] if loc else None
        if first.get("type") == "json_invalid":
            return ApiError(400, f"malformed JSON in the request body: {first.get('msg', '')}").response()
        return ApiError(422, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}", param=where).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return ApiError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return ApiError(500, "internal server error").response()

    def model_of(request: Request, name: str, scope: str, kinds: Sequence[str]) -> Served:
        access.check(request, scope)
        s = served.get(name)
        if s is None:
            raise ApiError(404, f"model '{name}' is not served; the served models: {', '.join(served)}",
                           param="model", code="model_not_found")
        access.check(request, scope, name)
        if s.kind not in kinds:
            raise ApiError(400, f"model '{name}' is a {s.kind}; {request.url.path} needs a "
                           f"{' or '.join(kinds)}", param="model")
        request.state.model = name
        return s

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(models=len(served))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8") if PAGE.is_file() else "<p>no chat page</p>")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    def schema() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                             routes=app.routes)
            if access.store is not None:  # the key every route but /health needs
                app.openapi_schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, operations in app.openapi_schema["paths"].items():
                    for operation in operations.values():
                        operation["security"] = [] if path in Access.OPEN else [{"bearer": []}]
        return app.openapi_schema

    app.openapi = schema

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def list_models(request: Request) -> ModelList:
        key = access.check(request)
        return ModelList(data=[ModelCard(id=s.name, created=s.created, kind=s.kind, context_length=s.context)
                               for s in served.values() if key is None or key.allows_model(s.name)])

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **ERRORS})
    async def prometheus(request: Request) -> Response:
        access.check(request, "admin")
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions", response_model=Completion, responses={**ERRORS, 200: {"content": STREAM}})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        s = model_of(request, body.model, "completions", ("lm", "seq2seq", "vae"))
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or len(prompts) * body.n > MAX_N * 4:
            raise ApiError(400, f"give 1 to {MAX_N * 4 // body.n} prompts (with n = {body.n})", param="prompt")
        ids = [_encode(s, p) for p in prompts]
        runs = [(p, _sampling(s, body, p, COMPLETION_MAX_TOKENS, (), body.seed)) for p in ids]
        return await _respond(request, s, body, runs, chat=False)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**ERRORS, 200: {"content": STREAM}})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        s = model_of(request, body.model, "chat", ("lm", "seq2seq", "vae"))
        prompt, stops = render_chat(s.tokenizer, [(m.role, m.text()) for m in body.messages])
        ids = _encode(s, prompt)
        end_ids = frozenset(i for i in (s.tokenizer.token_to_id(t) for t in END_OF_TURN) if i is not None)
        body.max_tokens = body.max_completion_tokens or body.max_tokens
        runs = [(ids, _sampling(s, body, ids, CHAT_MAX_TOKENS, stops, body.seed, end_ids))]
        return await _respond(request, s, body, runs, chat=True)

    @app.post("/v1/embeddings", response_model=EmbeddingList, responses=ERRORS)
    async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingList:
        s = model_of(request, body.model, "embeddings", ("lm",))
        texts = _inputs(body.input)
        ids = [s.tokenizer.encode(t) for t in texts]
        too_long = next((i for i, row in enumerate(ids) if len(row) > s.context), None)
        if too_long is not None:
            raise ApiError(400, f"input {too_long} is {len(ids[too_long])} tokens; model '{s.name}' reads at most "
                           f"{s.context}", param="input", code="context_length_exceeded")
        vectors = await s.run(embed, ids)
        n = sum(len(i) for i in ids)
        _count(request, s, n, 0)
        if body.encoding_format == "base64":
            vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
        return EmbeddingList(data=[Embedding(index=i, embedding=v) for i, v in enumerate(vectors)], model=s.name,
                             usage=Usage(prompt_tokens=n, total_tokens=n))

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS)
    async def classify_texts(body: ClassifyRequest, request: Request) -> ClassifyResponse:
        s = model_of(request, body.model, "classify", ("classifier",))
        texts = _inputs(body.input)
        probabilities = await s.run(classify, texts)
        n = sum(len(s.tokenizer.encode(t)) for t in texts)
        _count(request, s, n, 0)
        labels = s.model.labels
        data = [Classification(index=i, label=labels[max(range(len(p)), key=p.__getitem__)],
                               probabilities={label: round(v, 6) for label, v in zip(labels, p)})
                for i, p in enumerate(probabilities)]
        return ClassifyResponse(data=data, model=s.name, usage=Usage(prompt_tokens=n, total_tokens=n))

    @app.post(HE_CONTEXTS_PATH, response_model=HEContext, responses=ERRORS)
    async def register_he_context(body: HEContextRequest, request: Request) -> HEContext:
        s = model_of(request, body.model, "classify", ("classifier",))
        key = request.state.key
        data = _base64(body.context, "context")
        try:
            context = await asyncio.to_thread(load_public_context, data, s.model.head.in_features)
        except UserError as e:
            raise ApiError(400, str(e), param="context") from None
        context_id = he_contexts.add(key.name if key else None, (s.name, context))
        return HEContext(id=context_id, model=s.name, bytes=len(data))

    @app.post("/v1/classify/he", response_model=HEClassifyResponse, responses=ERRORS)
    async def classify_encrypted(body: HEClassifyRequest, request: Request) -> HEClassifyResponse:
        s = model_of(request, body.model, "classify", ("classifier",))
        key = request.state.key
        found = he_contexts.get(key.name if key else None, body.context_id)
        if found is None or found[0] != s.name:
            raise ApiError(404, f"no context '{body.context_id}' registered for model '{s.name}' by this key "
                           f"(contexts are kept in memory, a few per key: register it again with POST "
                           f"{HE_CONTEXTS_PATH})", param="context_id", code="context_not_found")
        context = found[1]
        ciphertext = _base64(body.input, "input")
        try:
            scores = await s.run(score_with, context, ciphertext)
        except UserError as e:
            raise ApiError(400, str(e), param="input") from None
        return HEClassifyResponse(model=s.name, labels=s.model.labels,
                                  scores=[base64.b64encode(c).decode() for c in scores])

    app.add_middleware(Guard, access=access, metrics=metrics, max_body=max_body,
                       audit_file=Path(audit_log_file) if audit_log_file else None,
                       body_limits={HE_CONTEXTS_PATH: max(max_body, MAX_CONTEXT_BYTES * 4 // 3 + 4096)})
    app.state.metrics = metrics

    def stop_engines() -> None:
        for s in served.values():
            if s.engine is not None:
                s.engine.stop()
            if s.worker is not None:
                s.worker.shutdown(wait=False, cancel_futures=True)

    app.router.on_shutdown.append(stop_engines)
    return app


# ----------------------------------------------------------------------------------------------
# generation requests


def render_chat(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> tuple[str, tuple[str, ...]]:
    """The prompt of a conversation and the strings that end its answer: the tokenizer's chat template,
    or the plain fallback template (module docstring) for a tokenizer without one."""
    conversation = [{"role": "system" if role == "developer" else role, "content": text} for role, text in messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
        except UserError as e:
            raise ApiError(400, str(e), param="messages") from None
        return prompt, tuple(s for s in END_OF_TURN if tokenizer.token_to_id(s) is None and s in prompt)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in conversation]
    return "\n".join(lines) + "\nAssistant:", FALLBACK_STOPS


def _encode(s: Served, text: str) -> list[int]:
    ids = s.tokenizer.encode(text) if text else [s.tokenizer.eos_id]
    if len(ids) >= s.context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; model '{s.name}' reads at most {s.context} "
                       f"(leave room for at least one new token)", param="prompt", code="context_length_exceeded")
    return ids


def _base64(text: str, param: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param}: not base64", param=param) from None


def _inputs(given: str | list[str]) -> list[str]:
    texts = [given] if isinstance(given, str) else given
    if not 1 <= len(texts) <= MAX_INPUTS:
        raise ApiError(400, f"input: give 1 to {MAX_INPUTS} texts", param="input")
    if any(not t.strip() for t in texts):
        raise ApiError(400, "input: every text needs some words", param="input")
    return texts


def _sampling(s: Served, body: _Sampled, ids: list[int], default_max: int, stops: Sequence[str], seed: int | None,
              end_ids: frozenset[int] = frozenset()) -> Sampling:
    """A request's sampling, checked: max_tokens within the context, at most MAX_STOP stop strings."""
    user_stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(user_stops) > MAX_STOP or any(not stop for stop in user_stops):
        raise ApiError(400, f"stop: give at most {MAX_STOP} non-empty strings", param="stop")
    room = s.context - len(ids)
    if body.max_tokens is not None and body.max_tokens > room:
        raise ApiError(400, f"max_tokens = {body.max_tokens}, but the prompt's {len(ids)} tokens leave room for "
                       f"{room} in the context of model '{s.name}' ({s.context} tokens)", param="max_tokens",
                       code="context_length_exceeded")
    return Sampling(max_tokens=body.max_tokens or min(default_max, room), temperature=body.temperature,
                    top_p=body.top_p if body.top_p < 1 else None, stop=tuple(user_stops) + tuple(stops),
                    stop_ids=frozenset({s.tokenizer.eos_id}) | end_ids, seed=seed)


def _count(request: Request, s: Served, prompt_tokens: int, completion_tokens: int) -> None:
    """Token counts for the audit record, the metrics and the key's tokens-per-minute limit."""
    request.state.prompt_tokens = getattr(request.state, "prompt_tokens", 0) + prompt_tokens
    request.state.completion_tokens = getattr(request.state, "completion_tokens", 0) + completion_tokens
    metrics: Metrics = request.app.state.metrics
    metrics.prompt_tokens.labels(s.name).inc(prompt_tokens)
    metrics.completion_tokens.labels(s.name).inc(completion_tokens)
    key = getattr(request.state, "key", None)
    if key is not None:
        request.app.state.access.limiter.record_tokens(key, prompt_tokens + completion_tokens)


async def _respond(request: Request, s: Served, body: _Sampled, runs: list[tuple[list[int], Sampling]],
                   chat: bool) -> Any:
    """Submit every choice (each prompt n times) to the engine; answer at the end, or as a stream."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    generations = []
    try:
        for p, (ids, sampling) in enumerate(runs):
            for j in range(body.n):
                index = p * body.n + j
                seeded = sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + j)

                def on_event(event: Event, index: int = index) -> None:
                    loop.call_soon_threadsafe(events.put_nowait, (index, event))

                generations.append(s.engine.submit(ids, seeded, on_event))
    except QueueFull:
        for g in generations:
            g.cancel()
        raise ApiError(503, f"model '{s.name}' is busy: too many requests waiting; retry shortly",
                       code="overloaded", headers={"Retry-After": "1"}) from None
    started = time.perf_counter()
    reply_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if body.stream:
        stream = _stream(request, s, body, generations, events, reply_id, created, chat, started)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    texts, reasons, usage = await _collect(request, generations, events, s, started)
    if chat:
        choices = [ChatChoice(index=i, message=AssistantMessage(content=texts[i]), finish_reason=reasons[i])
                   for i in range(len(texts))]
        return ChatCompletion(id=reply_id, created=created, model=s.name, choices=choices, usage=usage)
    choices = [CompletionChoice(index=i, text=texts[i], finish_reason=reasons[i]) for i in range(len(texts))]
    return Completion(id=reply_id, created=created, model=s.name, choices=choices, usage=usage)


async def _next(request: Request, events: asyncio.Queue) -> tuple[int, Event] | None:
    """The next event, or None once the client has gone away (checked twice a second)."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None


def _finish(request: Request, s: Served, finished: dict[int, Event], started: float, first: float | None) -> Usage:
    """The usage of all choices (the prompt counted once per prompt), counted into metrics and limits."""
    prompt_tokens = sum(e.prompt_tokens for e in finished.values())
    completion_tokens = sum(e.completion_tokens for e in finished.values())
    _count(request, s, prompt_tokens, completion_tokens)
    if first is not None:
        request.app.state.metrics.first_token.labels(s.name).observe(first - started)
    if any(e.finish_reason == "error" for e in finished.values()):
        raise ApiError(500, "generation failed on the server; see its log")
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


async def _collect(request: Request, generations: list, events: asyncio.Queue, s: Served, started: float
                   ) -> tuple[list[str], list[str | None], Usage]:
    texts = ["" for _ in generations]
    finished: dict[int, Event] = {}
    first = None
    try:
        while len(finished) < len(generations):
            item = await _next(request, events)
            if item is None:
                raise ApiError(400, "client disconnected")
            index, event = item
            first = first or time.perf_counter()
            texts[index] += event.text
            if event.finish_reason is not None:
                finished[index] = event
    finally:
        for g in generations:
            g.cancel()
    usage = _finish(request, s, finished, started, first)
    return texts, [finished[i].finish_reason for i in range(len(generations))], usage


async def _stream(request: Request, s: Served, body: _Sampled, generations: list, events: asyncio.Queue,
                  reply_id: str, created: int, chat: bool, started: float) -> AsyncIterator[str]:
    """Server-Sent Events in OpenAI's chunk format; cancelling (a client gone) frees the rows at once."""
    metrics: Metrics = request.app.state.metrics
    metrics.streams.inc()
    finished: dict[int, Event] = {}
    first = None

    def chunk(index: int, text: str | None, reason: str | None = None, role: bool = False,
              usage: Usage | None = None) -> str:
        base = {"id": reply_id, "created": created, "model": s.name}
        if chat:
            choices = [] if index < 0 else [ChunkChoice(index=index, delta=Delta(role="assistant" if role else None,
                                                                                 content=text), finish_reason=reason)]
            return f"data: {ChatCompletionChunk(**base, choices=choices, usage=usage).model_dump_json()}\n\n"
        choices = [] if index < 0 else [CompletionChoice(index=index, text=text or "", finish_reason=reason)]
        return f"data: {Completion(**base, choices=choices, usage=usage).model_dump_json()}\n\n"

    try:
        if chat:
            for i in range(len(generations)):
                yield chunk(i, "", role=True)
        while len(finished) < len(generations):
            item = await _next(request, events)
            if item is None:
                return
            index, event = item
            first = first or time.perf_counter()
            if event.finish_reason is None:
                yield chunk(index, event.text)
                continue
            finished[index] = event
            usage = _finish(request, s, finished, started, first) if len(finished) == len(generations) else None
            if event.finish_reason == "error":
                yield f"data: {json.dumps({'error': {'message': 'generation failed', 'type': 'server_error'}})}\n\n"
                return
            yield chunk(index, event.text, event.finish_reason, usage=usage)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield chunk(-1, None, usage=usage)
        yield "data: [DONE]\n\n"
    finally:
        for g in generations:
            g.cancel()
        metrics.streams.dec()


# ----------------------------------------------------------------------------------------------
# `lmforge serve`


LOOPBACK = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_served(specs: Sequence[str], device: str = "auto", dtype: str = "fp32") -> dict[str, Any]:
    """{id: model} for `NAME=SOURCE` or `SOURCE` specs (the id: a catalog name, or the directory's name)."""
    import lmforge.sources
    from lmforge.recipes.classify import HEAD_CONFIG
    from lmforge.tasks.classify import load_classifier
    from lmforge.train.checkpoint import verified_checkpoint

    models: dict[str, Any] = {}
    for spec in specs:
        name, _, source = spec.rpartition("=") if "=" in spec else ("", "", spec)
        path = Path(source)
        if not name:
            name = (path.parent.name if path.name == "best" else path.name) if path.exists() else source
        if name in models:
            raise UserError(f"two models are named '{name}'; name them: NAME=SOURCE")
        if path.is_dir() and (verified_checkpoint(path) / HEAD_CONFIG).is_file():
            models[name] = load_classifier(path, device)
        else:
            models[name] = lmforge.sources.load(source, device=device,
                                                dtype=lmforge.sources.GENERATION_DTYPES[dtype]).eval()
    return models


def serve(
    checkpoints: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    keys: str | None = None,
    insecure_no_auth: bool = False,
    max_batch: int = 16,
    max_queue: int = 64,
    audit_log: str | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    dtype: Literal["fp32", "bf16"] = "fp32",
    device: str = "auto",
) -> None:
    """Serve models over an OpenAI-compatible HTTP API, with API keys and a web chat page.

    Routes: /v1/models, /v1/completions, /v1/chat/completions (streaming), /v1/embeddings, /v1/classify
    (a classifier checkpoint) and /v1/classify/he (its head on CKKS-encrypted features), /metrics
    (Prometheus), /health, and the chat page at /. With --keys every
    route but /health and the page needs `Authorization: Bearer KEY`; the keys file is re-read when it
    changes (`lmforge keys create|revoke` take effect without a restart).

    Args:
        checkpoints: the models: checkpoints, run directories, Hugging Face directories, .gguf files or
            catalog models, each optionally named NAME=SOURCE (default name: the directory's or catalog's)
        host: the address to listen on; anything but a loopback address needs --keys (or --insecure-no-auth)
        port: the TCP port
        keys: the keys file (lmforge keys create); without it anyone who reaches the port may use the models
        insecure_no_auth: listen on a non-loopback address without keys (anyone on the network may use it)
        max_batch: sequences that generate at once per model (continuous batching)
        max_queue: requests that may wait per model; beyond that: 503 with Retry-After
        audit_log: also append the audit records (key name, route, status, tokens; no text) to this JSONL file
        ssl_certfile: serve HTTPS with this certificate (PEM), with --ssl-keyfile
        ssl_keyfile: the certificate's private key (PEM)
        dtype: the weights' dtype: fp32, or bf16 (half the memory)
        device: where the models run: auto (a GPU where there is one), cpu, cuda, cuda:N or mps
    """
    import uvicorn

    if not checkpoints:
        raise UserError("name at least one model to serve")
    if not is_loopback(host) and keys is None and not insecure_no_auth:
        raise UserError(f"--host {host} is reachable from other machines: give --keys KEYS_FILE (lmforge keys "
                        f"create), or --insecure-no-auth to serve without access control")
    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise UserError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
    for given in (ssl_certfile, ssl_keyfile, keys):
        if given is not None and not Path(given).is_file():
            raise UserError(f"no such file: {given}")
    if keys is not None:
        KeyStore(keys)  # a damaged keys file is an error before any model is loaded
    if not 1 <= max_batch <= 256 or max_queue < 0:
        raise UserError(f"--max-batch {max_batch} --max-queue {max_queue}: expected 1..256 and >= 0")
    app = create_app(load_served(checkpoints, device, dtype), keys=keys, max_batch=max_batch, max_queue=max_queue,
                     audit_log_file=audit_log)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    scheme = "https" if ssl_certfile else "http"
    print(f"serving {', '.join(app.state.served)} at {scheme}://{host}:{port}/ (chat page), "
          f"{scheme}://{host}:{port}/v1 (OpenAI API){' with keys from ' + keys if keys else ', no keys'}", flush=True)
    uvicorn.run(app, host=host, port=port, access_log=False, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                log_level="warning", timeout_graceful_shutdown=5)
