"""ONNX export of a decoder, and ONNX Runtime as a generation engine behind the one generate loop.

    lmforge export runs/x --format onnx --out runs/x-onnx                     # fp32 graph
    lmforge export runs/x --format onnx --onnx-dtype int8 --out runs/x-int8   # + onnxruntime's dynamic int8
    lmforge generate runs/x-onnx --prompt "ROMEO:"                            # runs on onnxruntime
    lmforge generate runs/x --engine onnxruntime                              # exports once to a cache, then runs

    from lmforge.infer.onnx import export_onnx, load_onnx
    export_onnx(lmforge.load("runs/x"), "runs/x-onnx")
    model = load_onnx("runs/x-onnx")              # the `Generative` protocol of lmforge.infer
    model.generate("ROMEO:", max_new_tokens=50)   # the same loop: sampling, stop strings, streaming

An export directory holds `model.onnx` (one graph for prefill and decode), `config.json` (the
ModelConfig, as in a checkpoint), `tokenizer.json` and `onnx.json` (what was exported, how, by which
versions). The graph has Hugging Face's decoder layout (that of optimum's ORTModelForCausalLM):

    inputs   input_ids (B, T) int64, attention_mask (B, P+T) int64 (1 = a real token),
             position_ids (B, T) int64, past_key_values.{i}.key / .value (B, n_kv_head, P, head_dim)
    outputs  logits (B, T, vocab), present.{i}.key / .value (B, n_kv_head, P+T, head_dim)

with dynamic batch, sequence and past lengths (P = 0 for the prefill). Left padding is what lmforge's
decoder does with its KV cache's `pad`: padded keys are never attended and positions start at each
row's first real token. `int8` quantizes the linear layers with onnxruntime's `quantize_dynamic`
(int8 weights per output channel, activations quantized per call; the MLPs' down projections and the
output head stay fp32, see `_quantize_int8`). The export needs `onnx` and `onnxscript` (torch's
dynamo exporter), running needs `onnxruntime`: `pip install 'lmforge[onnx]'`. The engine runs on
the CPU (onnxruntime's CPU execution provider), in fp32 or int8.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lmforge import crypto
from lmforge.config import ModelConfig, to_dict
from lmforge.errors import UserError
from lmforge.files import atomic_directory, check_new_directory
from lmforge.infer.generate import generate
from lmforge.perf import cache_dir
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import read_model_config

# Like the generate loop, this module does not import lmforge.models: a decoder is anything with a
# Decoder's parts (`config.kind == "decoder"`, tok_emb, pos_emb, rope, blocks, norm, head). It reads an
# export's config.json as a checkpoint's is read (`lmforge.train.checkpoint.read_model_config`).
GRAPH, INFO, CONFIG = "model.onnx", "onnx.json", "config.json"
ONNX_DTYPES = ("fp32", "int8")
INSTALL = "pip install 'lmforge[onnx]'"


def _require(module: str, purpose: str) -> Any:
    """Import an optional package of the onnx extra, or a one-line UserError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs the {module.split('.')[0]} package: {INSTALL}") from None


# ------------------------------------------------------------------------------------------------
# export

class _PastKV:
    """The cache the model's attention layers append to while the graph is traced: each layer's new
    keys and values go after the past ones it was given; the results are the graph's `present` outputs."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past_k, past_v = self.past[layer]
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, nkv, P+T, hd)
        self.present.append((k, v))
        return k, v


class DecoderGraph(nn.Module):
    """A Decoder's forward pass on flat tensors (Hugging Face's layout, the module docstring's), for export.

    It runs the decoder's own blocks; only the mask and the positions come from the inputs instead of
    a KVCache. A query at a padding position may see itself (no row is fully masked, so no NaN
    reaches the cache); real tokens never see padding.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        m = self.model
        T, S = input_ids.shape[1], attention_mask.shape[1]
        keys = torch.arange(S, device=input_ids.device)
        queries = torch.arange(T, device=input_ids.device) + (S - T)
        causal = keys[None, :] <= queries[:, None]  # (T, S)
        own = keys[None, :] == queries[:, None]
        mask = causal[None, None] & (attention_mask.bool()[:, None, None, :] | own[None, None])  # (B, 1, T, S)
        x = m.tok_emb(input_ids)  # (B, T, d_model)
        if m.pos_emb is not None:
            x = x + m.pos_emb(position_ids)
        rope = m.rope.cos_sin(position_ids, x.dtype) if m.rope is not None else None
        cache = _PastKV([(past[2 * i], past[2 * i + 1]) for i in range(len(m.blocks))])
        for block in m.blocks:
            x = block(x, rope, cache, mask)
        return (m.head(m.norm(x)), *(t for kv in cache.present for t in kv))


def graph_names(n_layer: int) -> tuple[list[str], list[str]]:
    """The graph's input and output names, in order (Hugging Face's)."""
    inputs = ["input_ids", "attention_mask", "position_ids"]
    inputs += [f"past_key_values.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]
    return inputs, outputs


def _export_graph(model: nn.Module, path: Path | None) -> bytes | None:
    """Trace `model` (fp32, eval) into an ONNX graph at `path` with torch's dynamo exporter (no path: the
    graph's serialized bytes, for an encrypted export)."""
    _require("onnxscript", "ONNX export")
    c = model.config
    B, T, P = 2, 3, 4  # distinct and > 1, so the exporter keeps every axis dynamic
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.ones(B, P + T, dtype=torch.long)
    positions = torch.arange(P, P + T)[None].expand(B, T).contiguous()
    past = tuple(torch.zeros(B, c.n_kv_head, P, c.head_dim) for _ in range(2 * c.n_layer))
    Dim = torch.export.Dim
    batch, seq, past_len = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
    total = Dim("total_sequence_length")
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
              tuple({0: batch, 2: past_len} for _ in past))
    inputs, outputs = graph_names(c.n_layer)
    large = sum(p.numel() for p in model.parameters()) * 4 > 1.8 * 2**30  # protobuf's 2 GB limit
    import contextlib
    import io
    import logging
    import warnings

    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed" notes
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(DecoderGraph(model), (ids, mask, positions, past),
                                        None if path is None else str(path), input_names=inputs,
                                        output_names=outputs, dynamic_shapes=shapes, dynamo=True,
                                        external_data=large, optimize=True)
        except TypeError as e:  # an older torch.onnx.export, without the dynamo exporter's arguments
            raise UserError(f"ONNX export needs torch's dynamo exporter (torch >= 2.6); this is torch "
                            f"{torch.__version__}: {e}") from None
    exporter_log.setLevel(level)
    return program.model_proto.SerializeToString() if path is None else None


def _quantize_int8(source: Path, target: Path, config: ModelConfig) -> None:
    """onnxruntime's dynamic quantization: the linear layers' weights to int8 (one scale per output
    channel), their inputs quantized at run time, per tensor.

    The MLPs' down projections stay fp32: their inputs (after GELU or SwiGLU) carry the outlier
    activations that one scale per tensor crushes (SmolLM2-135M, 196 tokens of English: the fp32
    graph's top token kept at 41% of positions with them quantized, 75% without). The output head
    stays fp32 too (with tied embeddings its weight is the embedding table's, transposed in the graph).
    """
    import logging

    import onnx

    quantization = _require("onnxruntime.quantization", "int8 ONNX export")
    graph = onnx.load(str(source), load_external_data=False).graph
    down = [config.d_ff, config.d_model]
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    keep = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and shapes.get(n.input[1]) == down]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the graph (shape inference: no gain for MatMuls)
    try:
        quantization.quantize_dynamic(str(source), str(target), weight_type=quantization.QuantType.QInt8,
                                      op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                                      nodes_to_exclude=keep,
                                      use_external_data_format=source.with_name(source.name + ".data").exists())
    finally:
        root.setLevel(level)


def export_onnx(model: nn.Module, out: str | Path, dtype: Literal["fp32", "int8"] = "fp32",
                source: str | None = None) -> Path:
    """Write `model` (an lmforge Decoder, with its tokenizer) as an ONNX export directory (the module docstring's).

    OUT must not exist or be empty; it is written atomically (nothing is left behind on failure).
    `dtype` int8 quantizes the graph's MatMul weights (onnxruntime's `quantize_dynamic`). Returns OUT.
    """
    if dtype not in ONNX_DTYPES:
        raise UserError(f"--onnx-dtype {dtype!r} is not supported; supported: {', '.join(ONNX_DTYPES)}")
    kind = getattr(getattr(model, "config", None), "kind", None)
    if kind != "decoder" or not all(hasattr(model, part) for part in ("tok_emb", "pos_emb", "rope", "blocks", "head")):
        raise UserError("ONNX export takes an lmforge decoder (causal LM); "
                        f"this model is a {kind or type(model).__name__}")
    _require("onnx", "ONNX export")
    if dtype == "int8":
        _require("onnxruntime.quantization", "int8 ONNX export")
    out = Path(out)
    check_new_directory(out)
    if model.head.weight.dtype != torch.float32 or model.training:
        model = copy.deepcopy(model).float().eval()
    encrypting = crypto.active_writing_key() is not None
    if encrypting and (dtype != "fp32" or sum(p.numel() for p in model.parameters()) * 4 > 1.8 * 2**30):
        raise UserError("an encrypted ONNX export is fp32 and under 2 GB (onnxruntime's quantization and external "
                        "data write plain files); drop --onnx-dtype int8 or --encrypt-key-file (nothing was written)")
    with atomic_directory(out) as tmp, torch.no_grad():
        if encrypting:  # serialized in memory, written encrypted: no plaintext graph on disk
            crypto.write_bytes(tmp / GRAPH, _export_graph(model, None))
        elif dtype == "fp32":
            _export_graph(model, tmp / GRAPH)
        else:
            with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f".{out.name}.fp32-") as fp32:
                _export_graph(model, Path(fp32) / GRAPH)
                _quantize_int8(Path(fp32) / GRAPH, tmp / GRAPH, model.config)
        crypto.write_bytes(tmp / CONFIG, json.dumps(to_dict(model.config), indent=2) + "\n")
        if model.tokenizer is not None:
            model.tokenizer.save(tmp)
        inputs, outputs = graph_names(model.config.n_layer)
        info = {"format": "onnx", "dtype": dtype, "graph": GRAPH, "layout": "huggingface-decoder-with-past",
                "inputs": inputs, "outputs": outputs, "source": source, "versions": _versions()}
        crypto.write_bytes(tmp / INFO, json.dumps(info, indent=2) + "\n")
    return out


def quantize_export(directory: str | Path, out: str | Path) -> Path:
    """An int8 copy of the fp32 ONNX export in `directory` (onnxruntime's `quantize_dynamic`), written
    atomically to OUT (which must not exist or be empty), without tracing the model again. Returns OUT."""
    directory, out = Path(directory), Path(out)
    if not is_onnx_directory(directory) or not (directory / CONFIG).is_file():
        raise UserError(f"{directory} is not an ONNX export with its {CONFIG}; "
                        "make one with lmforge export --format onnx")
    info = json.loads((directory / INFO).read_text()) if (directory / INFO).is_file() else {}
    if info.get("dtype", "fp32") != "fp32":
        raise UserError(f"{directory} is an {info['dtype']} export already; quantize an fp32 one")
    _require("onnxruntime.quantization", "int8 ONNX export")
    check_new_directory(out)
    with atomic_directory(out) as tmp:
        _quantize_int8(directory / GRAPH, tmp / GRAPH, read_model_config(directory))
        for name in (CONFIG, "tokenizer.json", "tokenizer_config.json"):
            if (directory / name).is_file():
                (tmp / name).write_bytes((directory / name).read_bytes())
        info = {**info, "dtype": "int8", "quantized_from": str(directory)}
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("lmforge", "torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def is_onnx_directory(path: str | Path) -> bool:
    """Whether `path` is a directory holding an ONNX graph (model.onnx), as `export_onnx` writes."""
    return Path(path).is_dir() and (Path(path) / GRAPH).is_file()


def cached_export(checkpoint: str | Path, load: Callable[[str | Path], nn.Module],
                  dtype: Literal["fp32", "int8"] = "fp32") -> Path:
    """The ONNX export of `checkpoint` in `$LMFORGE_CACHE/onnx/`, made on first use from the model
    `load(checkpoint)` returns (`lmforge.load`); keyed by the source's path, its files' sizes and times,
    and `dtype`."""
    key = hashlib.sha256(json.dumps([str(checkpoint), dtype, _fingerprint(checkpoint)]).encode()).hexdigest()[:16]
    target = cache_dir() / "onnx" / f"{Path(str(checkpoint)).name or 'model'}-{dtype}-{key}"
    if not is_onnx_directory(target):
        export_onnx(load(checkpoint), target, dtype, source=str(checkpoint))
    return target


def _fingerprint(path: str | Path) -> list:
    """Names, sizes and modification times of the files under `path` (empty for a catalog name)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    return [[str(f.relative_to(p) if p.is_dir() else f.name), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


# ------------------------------------------------------------------------------------------------
# the engine

class OnnxCache:
    """The past keys and values of every layer (numpy, (B, n_kv_head, length, head_dim)), as onnxruntime
    returned them, and the attention mask (B, length) that goes with them; the `Cache` protocol."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, pad: torch.Tensor | None):
        shape = (batch_size, config.n_kv_head, 0, config.head_dim)
        self.past = [np.zeros(shape, dtype=np.float32) for _ in range(2 * config.n_layer)]
        self.max_len = max_len
        self.length = 0
        self.pad = pad
        self.pad_np = pad.cpu().numpy().astype(np.int64) if pad is not None else np.zeros(batch_size, dtype=np.int64)
        self.mask = np.zeros((batch_size, 0), dtype=np.int64)
        self.condition: dict[str, torch.Tensor] = {}

    def select(self, rows: torch.Tensor) -> None:
        """Keep the given batch rows, in this order."""
        index = rows.cpu().numpy()
        self.past = [np.ascontiguousarray(t[index]) for t in self.past]
        self.mask, self.pad_np = self.mask[index], self.pad_np[index]
        if self.pad is not None:
            self.pad = self.pad[rows]


class OnnxDecoder:
    """A decoder exported by `export_onnx`, run by onnxruntime, with lmforge's `Generative` protocol."""

    def __init__(self, directory: Path, config: ModelConfig, tokenizer: Tokenizer | None, session: Any,
                 info: dict[str, Any]):
        self.directory, self.config, self.tokenizer, self.info = directory, config, tokenizer, info
        self.session = session  # an onnxruntime.InferenceSession
        self.input_names, self.output_names = graph_names(config.n_layer)

    def new_cache(self, batch_size: int, max_len: int | None = None, pad: torch.Tensor | None = None) -> OnnxCache:
        """An empty cache of `max_len` positions (default: the context); `pad` (B,) counts each row's left padding."""
        return OnnxCache(self.config, batch_size, max_len or self.config.block_size, pad)

    def __call__(self, ids: torch.Tensor, *, cache: OnnxCache, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) of ids (B, T) after the cached tokens (last_only: (B, 1, vocab)); the cache grows."""
        B, T = ids.shape
        start = cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.block_size}")
        new = np.arange(start, start + T, dtype=np.int64)
        positions = np.maximum(new[None, :] - cache.pad_np[:, None], 0)  # (B, T): left padding shifts positions
        mask = np.concatenate([cache.mask, (new[None, :] >= cache.pad_np[:, None]).astype(np.int64)], axis=1)
        feeds = {"input_ids": ids.cpu().numpy().astype(np.int64, copy=False), "attention_mask": mask,
                 "position_ids": positions}
        feeds.update(zip(self.input_names[3:], cache.past))
        logits, *present = self.session.run(self.output_names, feeds)
        cache.past, cache.mask, cache.length = present, mask, start + T
        return torch.from_numpy(logits[:, -1:] if last_only else logits)

    def parameters(self) -> Iterator[nn.Parameter]:
        """None: the weights live in onnxruntime; the generate loop's batches stay on the CPU."""
        return iter(())

    def generate(self, *args: Any, **kwargs: Any) -> list[str]:
        """Continuations of the prompt(s): the options and the output are those of `lmforge.infer.generate.generate`."""
        return generate(self, *args, **kwargs)


def load_onnx(directory: str | Path, threads: int | None = None) -> OnnxDecoder:
    """The ONNX export in `directory` on onnxruntime's CPU provider, with its tokenizer attached.

    `threads` is onnxruntime's intra-op thread count (default: torch.get_num_threads(), as torch uses).
    """
    directory = Path(directory)
    if not is_onnx_directory(directory):
        raise UserError(f"{directory} is not an ONNX export (no {GRAPH}); make one with "
                        f"lmforge export CHECKPOINT --format onnx --out {directory}")
    if not (directory / CONFIG).is_file():
        raise UserError(f"{directory / CONFIG} is missing; an ONNX export needs the config.json written beside "
                        f"{GRAPH} by lmforge export --format onnx")
    ort = _require("onnxruntime", "the onnxruntime engine")
    config = read_model_config(directory)
    if config.kind != "decoder":
        raise UserError(f"{directory / CONFIG}: model kind {config.kind!r}; the ONNX engine runs decoders")
    info_file = directory / INFO
    info = json.loads(crypto.read_bytes(info_file)) if info_file.is_file() else {}
    tokenizer = Tokenizer.load(directory) if (directory / "tokenizer.json").is_file() else None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    graph = directory / GRAPH  # an encrypted graph is decrypted into memory only
    source = bytes(crypto.read_bytes(graph)) if crypto.is_encrypted(graph) else str(graph)
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for a damaged or foreign graph
        raise UserError(f"{directory / GRAPH}: onnxruntime cannot load it: {str(e).splitlines()[0]}") from None
    names = [i.name for i in session.get_inputs()]
    expected, _ = graph_names(config.n_layer)
    if names != expected:
        raise UserError(f"{directory / GRAPH} does not match {directory / CONFIG}: inputs {names[:4]}..., "
                        f"expected {expected[:4]}... for {config.n_layer} layers")
    return OnnxDecoder(directory, config, tokenizer, session, info)
