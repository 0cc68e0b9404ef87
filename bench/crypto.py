"""Encryption at rest measured: the load time of an encrypted SmolLM2-135M checkpoint next to the plain one, and
the encryption and decryption throughput.

    python bench/crypto.py                  # SmolLM2-135M-Instruct in fp32 (538 MB of weights); about 2 minutes
    python bench/crypto.py --quick          # a tiny random model (a smoke run, seconds)

Load: `lmforge.load(PATH)` against `lmforge.load(ENCRYPTED, key=KEY)`, alternating (plain, encrypted, plain,
...), `--rounds` each, the median of each; the target is a ratio of at most 1.2. ENCRYPTED is the checkpoint
saved with a writing key (as `--encrypt-key-file` writes it: its files sealed in lmforge.json); a third
row is the plain checkpoint encrypted afterwards by `lmforge encrypt` (no seals: verified by decrypting and
hashing every file). Each load starts as a new process's would: the checkpoint is verified again
(`lmforge.train.checkpoint`'s per-process cache cleared), its files read from the page cache (they were
read once before timing), so the figure is the CPU's cost, not the disk's. The encrypted load also breaks
down into its parts: the verification, the decryption of model.safetensors into one buffer, the rest.

Throughput: `crypto.encrypt_file` of model.safetensors (AES-256-GCM, 4 MiB chunks, a data key) and
`crypto.read_bytes` of the encrypted file (decrypted into memory), in MB/s (10^6 bytes), the median of
3 runs; sha256 of the same bytes beside them for scale.

One JSON line per figure; a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, emit, machine_state, smollm2_fp32  # noqa: E402


def tiny_checkpoint(directory: Path) -> Path:
    """A random decoder of a few MB, saved as a checkpoint (no download)."""
    import torch

    from lmforge.config import ModelConfig
    from lmforge.models.decoder import Decoder
    from lmforge.tokenizer import train_tokenizer
    from lmforge.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog " * 20], vocab_size=300)
    model = Decoder(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=4, d_model=128))
    return save_checkpoint(directory / "tiny", model, tokenizer)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def mb_per_s(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random model instead of SmolLM2-135M")
    parser.add_argument("--rounds", type=int, default=5, help="loads of each kind, alternating")
    args = parser.parse_args()

    import lmforge
    from lmforge import crypto
    from lmforge.train import checkpoint

    emit(machine_state())
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-crypto-") as tmp:
        tmp = Path(tmp)
        plain = tiny_checkpoint(tmp) if args.quick else smollm2_fp32()
        key_file = crypto.keygen(str(tmp / "data.key"))
        key = crypto.load_key(key_file)
        with crypto.writing_key(key):  # as `--encrypt-key-file` writes a checkpoint
            checkpoint.save_checkpoint(tmp / "encrypted", lmforge.load(plain), info=checkpoint.read_info(plain))
        encrypted = tmp / "encrypted"
        afterwards = crypto.encrypt(str(plain), str(key_file), str(tmp / "encrypted-afterwards"))
        weights = plain / checkpoint.WEIGHTS
        size = weights.stat().st_size

        def load(path: Path, key_arg=None) -> float:
            checkpoint._verified.clear()  # as a new process: the checkpoint verified again
            return timed(lambda: lmforge.load(path, key=key_arg))

        sides = {"plain": lambda: load(plain), "encrypted": lambda: load(encrypted, key),
                 "lmforge encrypt": lambda: load(afterwards, key)}
        for measure in sides.values():  # warm: the page cache and the imports
            measure()
        times = alternate(sides, args.rounds)
        medians = {name: statistics.median(values) for name, values in times.items()}
        ratio = medians["encrypted"] / medians["plain"]
        emit({"figure": "load", "model": "tiny random" if args.quick else "SmolLM2-135M-Instruct fp32",
              "weights_bytes": size, "rounds": args.rounds, **{f"{k}_s": round(v, 3) for k, v in medians.items()},
              "ratio": round(ratio, 3),
              "ratio_lmforge_encrypt": round(medians["lmforge encrypt"] / medians["plain"], 3),
              "target": 1.2, **{f"{k}_all_s": [round(t, 3) for t in v] for k, v in times.items()}})

        with crypto.reading_key(key):  # the encrypted load's parts
            checkpoint._verified.clear()
            verify = timed(lambda: checkpoint.verify_checkpoint(encrypted))
            decrypt = timed(lambda: crypto.read_bytes(encrypted / checkpoint.WEIGHTS))
        emit({"figure": "encrypted load parts", "verify_s": round(verify, 3), "decrypt_weights_s": round(decrypt, 3),
              "rest_s": round(medians["encrypted"] - verify - decrypt, 3)})

        rates = {"encrypt": [], "decrypt": [], "sha256": []}
        for i in range(3):
            out = tmp / f"weights-{i}.enc"
            rates["encrypt"].append(mb_per_s(size, timed(lambda: crypto.encrypt_file(weights, out, key))))  # noqa: B023
            rates["decrypt"].append(mb_per_s(size, timed(lambda: crypto.read_bytes(out, key))))  # noqa: B023
            data = weights.read_bytes()
            rates["sha256"].append(mb_per_s(size, timed(lambda: hashlib.sha256(data).digest())))  # noqa: B023
            out.unlink()
        throughput = {name: statistics.median(values) for name, values in rates.items()}
        emit({"figure": "throughput_MB_per_s", "bytes": size, "chunk_MiB": crypto.DEFAULT_CHUNK >> 20, **throughput})

    afterwards_ratio = medians["lmforge encrypt"] / medians["plain"]
    print(f"\n| figure | plain | encrypted | ratio (target <= 1.2) |\n|---|---|---|---|\n"
          f"| load, median of {args.rounds} | {medians['plain']:.3f} s | {medians['encrypted']:.3f} s | "
          f"{ratio:.2f}x |\n"
          f"| load, encrypted afterwards (lmforge encrypt) | | {medians['lmforge encrypt']:.3f} s | "
          f"{afterwards_ratio:.2f}x |\n")
    print(f"| AES-256-GCM encrypt | decrypt (to memory) | sha256, for scale |\n|---|---|---|\n"
          f"| {throughput['encrypt']:,.0f} MB/s | {throughput['decrypt']:,.0f} MB/s | "
          f"{throughput['sha256']:,.0f} MB/s |")


if __name__ == "__main__":
    main()
