"""The checkpoint directory: the one format every lmforge model is saved in and loaded from.

    CHECKPOINT/
      config.json        the ModelConfig (kind and sizes); in a quantized checkpoint also `quantization`
                         (bits, group size, method, the layers: lmforge.infer.quantize), in a pruned one
                         `pruning` (method, pattern, sparsity: lmforge.infer.prune)
      model.safetensors  the weights (fp32; a quantized layer's integer codes and fp32 scales)
      tokenizer.json     the tokenizer
      tokenizer_config.json  its eos/bos tokens and chat template (Hugging Face style; only when it has them)
      lmforge.json       versions, data fingerprint, training summary, or where an imported model came from
      trainer_state.pt   optimizer, step and RNG states (only where a run can be resumed)
      sharded/           FSDP's model and optimizer shards (torch.distributed.checkpoint), where a run
                         trained with --train.strategy fsdp can be resumed; its last checkpoint also holds
                         model.safetensors, and one without it loads from the shards (or `lmforge consolidate`)

A LoRA fine-tuning checkpoint holds `adapter_model.safetensors` and `adapter_config.json` (peft's
format) instead of the weights, and names its base model in lmforge.json (`base`).

A checkpoint is written to a temporary directory beside its destination, fsynced and renamed into
place, so a crash never leaves a half-written checkpoint. lmforge.json records every other file
(`files`: name -> bytes and sha256), and every load first checks the checkpoint
(`verify_checkpoint`): a missing, truncated or altered file, an unreadable safetensors header or
invalid JSON is a one-line `UserError` naming the file. Checkpoints written before the record
existed get the structural checks only. A checkpoint verified once is not hashed again by the same
process while its files keep their sizes and modification times.

The Trainer keeps the checkpoint before the last one in `checkpoint.prev/` (`previous_of`): the new
one replaces `checkpoint/` only once written, fsynced and verified, the old one then moves to
`checkpoint.prev/`, so a crash at any moment leaves a complete checkpoint under one of the two names
(`resolve_checkpoint` looks at both; temporary directories are hidden and never picked). A run
directory thus takes up to twice the space of one checkpoint.

Encryption at rest (`lmforge.crypto`): while a writing key is set (`--encrypt-key-file`) every file
of the checkpoint is written encrypted, straight from memory (no plaintext file at any moment).
lmforge.json records the contents (size and sha256 of the plaintext), whether stored plain or
encrypted, so `lmforge encrypt` / `lmforge decrypt` of a checkpoint keep it valid; an encrypted file
is checked by decrypting (so authenticating) and hashing it. A file written encrypted is also
recorded by its `sealed` digest (`crypto.seal`: the header and every chunk's nonce and tag), which
is checked instead, at the cost of a few bytes read per 4 MiB: each chunk is authenticated against
its tag when it is read, so a sealed file decrypts to what was saved or not at all, and a file
swapped in from another checkpoint encrypted with the same key (which authentication alone would
accept) is refused. Every read goes through `crypto.read_bytes`, which decrypts in memory with the
process's key; the weights become tensors viewing the one decrypted buffer (`tensors_from_buffer`),
without a second copy.

Loaders start with `verified_checkpoint(path)` (resolve, then verify), or use `load_checkpoint`,
`load_weights`, `read_info` or `load_trainer_state`, which verify. They read safetensors and JSON,
and `torch.load(weights_only=True)`: no pickled code is ever run.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import pickle
import platform
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from lmforge import crypto
from lmforge.config import MODEL_KINDS, ModelConfig, from_dict, to_dict
from lmforge.errors import UserError
from lmforge.files import atomic_directory
from lmforge.kernels.quantized import quantize_layers
from lmforge.models import build_model
from lmforge.tokenizer import Tokenizer

CONFIG, WEIGHTS, TOKENIZER, INFO, TRAINER_STATE = (
    "config.json", "model.safetensors", "tokenizer.json", "lmforge.json", "trainer_state.pt"
)
SHARDED = "sharded"  # the directory of FSDP's shards, in a checkpoint of --train.strategy fsdp
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
QUANTIZATION = "quantization"  # the key of config.json that says which layers are quantized, and how
PRUNING = "pruning"  # the key of config.json that says how the model was pruned (lmforge.infer.prune)
RECORDS = (QUANTIZATION, PRUNING)  # what config.json holds beside the ModelConfig, kept as the model's attributes
FILES = "files"  # the key of lmforge.json that records the checkpoint's other files

_verified: set[tuple] = set()  # signatures (names, sizes, mtimes, inodes) of checkpoints found whole


def versions() -> dict[str, str]:
    from lmforge import __version__

    return {"lmforge": __version__, "torch": torch.__version__, "python": platform.python_version()}


def previous_of(directory: Path) -> Path:
    """Where the Trainer keeps the checkpoint before `directory`'s current one: `checkpoint.prev/`."""
    return directory.with_name(directory.name + ".prev")


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    tokenizer: Tokenizer | None = None,
    info: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    keep_previous: bool = False,
    sharded: Path | None = None,
) -> Path:
    """Write `model` (or `state_dict`, e.g. fp32 master weights) and friends to `directory`, atomically.

    The files are recorded in lmforge.json and verified before the checkpoint takes `directory`'s
    place; with `keep_previous` the checkpoint it replaces moves to `previous_of(directory)`.
    `sharded`: a directory of FSDP shards (lmforge.train.fsdp) moved into the checkpoint as `sharded/`;
    the weights are then written only where `state_dict` is given.
    """
    directory = Path(directory)
    if sharded is not None and crypto.active_writing_key() is not None:
        raise UserError("--encrypt-key-file does not cover FSDP's sharded checkpoints; train with "
                        "--train.strategy ddp, or encrypt a consolidated checkpoint with `lmforge encrypt`")
    with atomic_directory(directory, previous_of(directory) if keep_previous else None) as tmp:
        if sharded is not None:
            sharded.rename(tmp / SHARDED)
            if state_dict is None:
                state_dict = {}
        weights = state_dict if state_dict is not None else model.state_dict()
        weights = {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()).contiguous()
                   for k, v in weights.items()}  # integer tensors: a quantized model's codes
        if hasattr(model, "save_head"):  # a task head on a backbone (a classifier): the head writes its own files
            weights = model.save_head(tmp, weights)  # and returns the backbone's weights, saved below as usual
            model = model.backbone
        if hasattr(model, "peft_config"):  # LoRA: only the adapters, in peft's own format
            from peft import get_peft_model_state_dict

            save_tensors(get_peft_model_state_dict(model, state_dict=weights), tmp / ADAPTER_WEIGHTS)
            adapter = model.peft_config["default"].to_dict()  # what peft's save_pretrained writes, through crypto
            adapter = {k: sorted(v) if isinstance(v, set) else v for k, v in adapter.items()}
            crypto.write_bytes(tmp / ADAPTER_CONFIG, json.dumps(adapter, indent=2, sort_keys=True))
        elif weights or sharded is None:
            save_tensors(weights, tmp / WEIGHTS, metadata={"format": "pt"})
        if isinstance(model.config, ModelConfig):
            values = {**to_dict(model.config), **{key: getattr(model, key) for key in RECORDS
                                                   if getattr(model, key, None)}}
            crypto.write_bytes(tmp / CONFIG, json.dumps(values, indent=2) + "\n")
        else:  # a transformers model with no native port: its config.json, so transformers loads the directory
            crypto.write_bytes(tmp / CONFIG, model.config.to_json_string())
        tokenizer = tokenizer or getattr(model, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)  # and tokenizer_config.json beside it when there is metadata
        if trainer_state is not None:
            buffer = io.BytesIO()
            torch.save(trainer_state, buffer)
            crypto.write_bytes(tmp / TRAINER_STATE, buffer.getbuffer())
        record = {"versions": versions(), **(info or {}), FILES: _describe_files(tmp)}
        crypto.write_bytes(tmp / INFO, json.dumps(record, indent=2) + "\n")
        verify_checkpoint(tmp)
    return directory


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file at `path`; while a writing key is set, serialized in memory and written encrypted."""
    if crypto.active_writing_key() is None:
        save_file(tensors, path, metadata=metadata)
    else:
        crypto.write_bytes(path, save(tensors, metadata=metadata))


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file at `path`, decrypted in memory where it is encrypted; a damaged
    file is a one-line UserError."""
    try:
        if crypto.is_encrypted(path):
            return {k: v.to(device) for k, v in tensors_from_buffer(crypto.read_bytes(path), path).items()}
        return load_file(path, device=str(device))
    except SafetensorError as e:
        raise UserError(f"damaged checkpoint: {path} cannot be read ({_first_line(e)})") from None


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def tensors_from_buffer(buffer: bytearray, name: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of safetensors data held in `buffer`, as views of it (no copy; they keep it alive)."""
    length = int.from_bytes(buffer[:8], "little") if len(buffer) >= 8 else len(buffer)
    try:
        if 8 + length > len(buffer):
            raise ValueError("header past the end")
        entries = json.loads(bytes(buffer[8:8 + length]))
        start, tensors = 8 + length, {}
        for key, entry in entries.items():
            if key == "__metadata__":
                continue
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
            count = 1
            for n in shape:
                count *= n
            itemsize = torch.empty((), dtype=dtype).element_size()
            if not 0 <= begin <= end <= len(buffer) - start or end - begin != count * itemsize:
                raise ValueError(f"{key}: offsets {begin}..{end} do not hold {shape}")
            if count == 0:
                tensors[key] = torch.empty(shape, dtype=dtype)
            elif (start + begin) % itemsize:  # unaligned: a copy, as safetensors would make
                tensors[key] = torch.frombuffer(bytes(buffer[start + begin:start + end]), dtype=dtype).view(shape)
            else:
                tensors[key] = torch.frombuffer(buffer, dtype=dtype, count=count, offset=start + begin).view(shape)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise UserError(f"damaged checkpoint: {name} has no readable safetensors header ({_first_line(e)})") from None
    return tensors


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory for `path`: itself, or inside a run directory the `best/` checkpoint
    (kept by fine-tuning) or else the last one, `checkpoint/` (or, where a crash while replacing it
    left no `checkpoint/`, `checkpoint.prev/`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no such checkpoint: {path}")
    if (path / CONFIG).is_file():
        return path
    last = path / "checkpoint"
    for directory in (path / "best", last if last.exists() else previous_of(last)):
        if (directory / CONFIG).is_file():
            return directory
    raise UserError(f"{path} is not an lmforge checkpoint (no {CONFIG}; expected a directory written by "
                    f"lmforge pretrain or lmforge import)")


def verified_checkpoint(path: str | Path) -> Path:
    """`resolve_checkpoint(path)`, verified whole (`verify_checkpoint`): what every loader starts with."""
    directory = resolve_checkpoint(path)
    verify_checkpoint(directory)
    return directory


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Check that the checkpoint in `directory` is whole; return its lmforge.json (empty without one).

    Every file lmforge.json records must be there with its size and sha256, every JSON file must
    parse, every safetensors file must have a readable header describing exactly its size, and
    trainer_state.pt must be a readable archive. A problem is a one-line UserError naming the file.
    """
    directory = Path(directory)
    info = _read_json(directory / INFO) if (directory / INFO).is_file() else {}
    files = info.get(FILES, {}) if isinstance(info, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise UserError(f"damaged checkpoint: {directory / INFO} is not an lmforge record "
                        f"(expected a JSON object with a {FILES!r} object)")
    signature = _signature(directory)
    if signature not in _verified:
        for name, expected in files.items():
            _check_recorded(directory / name, expected)
        for path in sorted(directory.iterdir()):
            _check_readable(path)
        _verified.add(signature)
    return info


def _describe_files(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative name: {"bytes": size, "sha256": digest}} for every file under `directory`."""
    return {path.relative_to(directory).as_posix(): {"bytes": crypto.content_size(path), "sha256": _sha256(path),
                                                     **({"sealed": crypto.seal(path)} if crypto.is_encrypted(path)
                                                        else {})}
            for path in sorted(directory.rglob("*")) if path.is_file()}


def _sha256(path: Path) -> str:
    """The sha256 of the file's contents (decrypted in memory, block by block, where it is encrypted)."""
    digest = hashlib.sha256()
    for block in crypto.iter_content(path):
        digest.update(block)
    return digest.hexdigest()


def _signature(directory: Path) -> tuple:
    """What changes when any file of `directory` is replaced, resized or written to."""
    stats = [(p.relative_to(directory).as_posix(), p.stat()) for p in sorted(directory.rglob("*")) if p.is_file()]
    return tuple((name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev) for name, st in stats)


def _check_recorded(path: Path, expected: dict[str, Any]) -> None:
    """The file lmforge.json describes: present, of its recorded size and sha256."""
    if not path.is_file():
        raise UserError(f"damaged checkpoint: {path} is missing (lmforge.json lists it)")
    size = crypto.content_size(path)
    if size != expected.get("bytes"):
        raise UserError(f"damaged checkpoint: {path} has {size} bytes, lmforge.json records {expected.get('bytes')} "
                        f"(truncated or overwritten)")
    if "sealed" in expected and crypto.is_encrypted(path):  # the chunks are authenticated as they are read
        if not hmac.compare_digest(crypto.seal(path), str(expected["sealed"])):
            raise UserError(f"damaged checkpoint: {path} is not the encrypted file lmforge.json records (replaced "
                            f"since it was saved)")
        return
    if _sha256(path) != expected.get("sha256"):
        raise UserError(f"damaged checkpoint: {path} does not match the sha256 in lmforge.json (changed since "
                        f"it was saved; remove {FILES!r} from lmforge.json to accept deliberate edits)")


def _check_readable(path: Path) -> None:
    """The structure of one file, by its kind: JSON parses, safetensors and torch archives are whole.

    An encrypted file's chunks are authenticated as it is read: only its JSON is read here."""
    if path.suffix != ".json" and crypto.is_encrypted(path):
        return
    if path.suffix == ".json":
        _read_json(path)
    elif path.suffix == ".safetensors":
        _check_safetensors(path)
    elif path.suffix == ".pt" and not zipfile.is_zipfile(path):
        raise UserError(f"damaged checkpoint: {path} is not a readable torch archive (truncated or overwritten)")


def _check_safetensors(path: Path) -> None:
    """An 8-byte header length, a JSON header, and tensor data ending exactly at the end of the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = f.read(length) if size >= 8 and length <= size - 8 else None
    try:
        entries = json.loads(header)
        end = max((e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__"), default=0)
        if not isinstance(end, int):
            raise TypeError(end)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError):
        raise UserError(f"damaged checkpoint: {path} has no readable safetensors header "
                        f"(truncated or overwritten)") from None
    if 8 + length + end != size:
        raise UserError(f"damaged checkpoint: {path} has {size} bytes but its header describes "
                        f"{8 + length + end} (truncated or overwritten)")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(crypto.read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def read_model_config(directory: Path) -> ModelConfig:
    """The ModelConfig of `directory`'s config.json; a one-line UserError naming the file where it is not one."""
    return read_config_file(directory)[0]


def read_config_file(directory: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """config.json's ModelConfig and its other records ({"quantization": ..., "pruning": ...}, those
    present), read once."""
    values = _read_json(directory / CONFIG)
    if not isinstance(values, dict):
        raise UserError(f"{directory / CONFIG} must hold a JSON object (a ModelConfig)")
    records = {key: values.pop(key) for key in RECORDS if values.get(key)}
    kind = values.get("kind", "decoder")
    if kind not in MODEL_KINDS:
        raise UserError(f"{directory / CONFIG}: model kind {kind!r} is not supported; "
                        f"supported: {', '.join(MODEL_KINDS)}")
    return from_dict(ModelConfig, values, str(directory / CONFIG)).validate(), records


def load_weights(directory: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of `directory`'s model.safetensors (or FSDP's `sharded/`), once the checkpoint is verified."""
    verify_checkpoint(directory)
    if not (directory / WEIGHTS).is_file() and (directory / SHARDED).is_dir():
        return {k: v.to(device) for k, v in sharded_weights(directory / SHARDED).items()}
    if not (directory / WEIGHTS).is_file():
        raise UserError(f"{directory} has no {WEIGHTS}")
    return load_tensors(directory / WEIGHTS, device)


def sharded_weights(path: Path, part: str = "model") -> dict[str, torch.Tensor]:
    """The model's whole tensors from FSDP's shards, read in this one process (no process group).

    `part="optimizer"`: AdamW's tensors instead, by flattened name ("state.blocks.0.mlp.fc.weight.exp_avg")."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as load_shards
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(path)
    try:
        entries = reader.read_metadata().state_dict_metadata
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise UserError(f"damaged checkpoint: {path} cannot be read ({_first_line(e)})") from None
    weights = {name.removeprefix(part + "."): torch.empty(entry.size, dtype=entry.properties.dtype)
               for name, entry in entries.items()
               if name.startswith(part + ".") and isinstance(entry, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        load_shards({part: weights}, storage_reader=reader, no_dist=True)
    return weights


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load the model of a checkpoint directory (or run directory), with its tokenizer attached.

    The class follows the config's `kind`: a Decoder, a Seq2Seq or a VAE (`lmforge.models.build_model`).
    """
    directory = verified_checkpoint(path)
    config, records = read_config_file(directory)
    quantization = records.get(QUANTIZATION)
    state = load_weights(directory, device)
    with torch.device("meta"):
        model = build_model(config)
        for key, record in records.items():
            setattr(model, key, record)
        if quantization:
            try:
                quantize_layers(model, quantization)
            except (KeyError, ValueError, TypeError, AttributeError) as e:
                raise UserError(f"damaged checkpoint: {directory / CONFIG} has an invalid {QUANTIZATION} entry "
                                f"({_first_line(e)})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    resized = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape
                     or state[k].is_floating_point() != expected[k].is_floating_point())
    if missing or unexpected or resized:
        raise UserError(f"{directory / WEIGHTS} does not match {CONFIG}: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}, of other sizes or types {resized[:3]}")
    model.load_state_dict(state, assign=True)
    if dtype is not None:
        model.to(dtype)
    if (directory / TOKENIZER).is_file():
        model.tokenizer = Tokenizer.load(directory)  # tokenizer.json + tokenizer_config.json
        if model.tokenizer.vocab_size > config.vocab_size:
            raise UserError(f"{directory / TOKENIZER} has {model.tokenizer.vocab_size} tokens but the model "
                            f"has {config.vocab_size}; the tokenizer does not belong to this model")
    return model.eval()


def read_info(path: str | Path) -> dict[str, Any]:
    """lmforge.json of a checkpoint (or run directory), verified, without its record of the files."""
    info = verify_checkpoint(resolve_checkpoint(path))
    return {k: v for k, v in info.items() if k != FILES}


def load_trainer_state(directory: Path) -> dict[str, Any]:
    """trainer_state.pt of a verified checkpoint: step, optimizer and scaler states (no code is run)."""
    verify_checkpoint(directory)
    try:
        return torch.load(io.BytesIO(crypto.read_bytes(directory / TRAINER_STATE)), map_location="cpu",
                          weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise UserError(f"damaged checkpoint: {directory / TRAINER_STATE} cannot be read ({_first_line(e)})") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
