"""Tests of training beyond one process: FSDP2 (`--train.strategy fsdp`) and two torchrun launchers as two nodes.

FSDP over two CPU processes (gloo) equals one process; a run stopped by SIGTERM and resumed from its
sharded checkpoint equals an uninterrupted one exactly; the shards make a normal checkpoint that
`lmforge.load` reads (in one process, no torchrun) and that generates as the FSDP-trained weights do;
one process resumes what two saved;
bad settings are one-line errors. Two launchers with `--nnodes 2` and a c10d rendezvous on 127.0.0.1
train as one process does. The runs are tests/scripts/train_tiny.py, as in tests/test_trainer.py.
"""

from __future__ import annotations

import shutil
import signal
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from test_trainer import (  # the helpers of the DDP test, and its `train_tiny` fixture
    CLI_SCRIPT,
    WEIGHTS_ATOL,
    argv,
    assert_same_run,
    checkpoint_step,
    start,
    stop,
    train_losses,
    train_tiny,  # noqa: F401
    weights,
)

import lmforge
from lmforge.config import TrainConfig
from lmforge.errors import UserError
from lmforge.train.checkpoint import SHARDED, WEIGHTS, sharded_weights

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# 8 steps of 2 micro-batches, evaluated and saved at steps 4 and 8 (and where SIGTERM stops the run)
OPTIONS = dict(max_steps=8, batch_size=4, grad_accum=2, precision="fp32", eval_interval=4, log_interval=1)
STOP_AT = 6


def finish(process, log: Path, codes: tuple[int, ...] = (0,), timeout: float = 120) -> str:
    """Wait for a process `start` started; its log, once its exit status is one of `codes`."""
    try:
        process.wait(timeout=timeout)
    finally:
        stop(process)
    text = log.read_text(errors="replace")
    assert process.returncode in codes, f"exit status {process.returncode}:\n" + text[-4000:]
    return text


@pytest.fixture(scope="module")
def fsdp_runs(shards, tmp_path_factory, train_tiny) -> dict[str, Path]:  # noqa: F811
    """One process; FSDP over two processes; FSDP stopped by SIGTERM after step 6 (a copy kept as
    `stopped`), then resumed. Returns the run directories and the logs of the two FSDP runs."""
    root = tmp_path_factory.mktemp("fsdp")
    runs = {name: root / name for name in ("one", "fsdp", "resumed", "stopped")}
    two = [*TORCHRUN, "--standalone", "--nproc_per_node", "2"]
    full = start(argv(shards, runs["fsdp"], strategy="fsdp", **OPTIONS), root / "fsdp.log", launcher=two)
    stopping = start(argv(shards, runs["resumed"], strategy="fsdp", sigterm_during=STOP_AT, **OPTIONS),
                     root / "stopped.log", launcher=two, script=CLI_SCRIPT)
    try:
        train_tiny.main(argv(shards, runs["one"], **OPTIONS))  # meanwhile, in this process
    finally:  # torchrun reports the workers' 128 + SIGTERM as a failure of its own: 1
        runs["fsdp.log"] = root / "fsdp.log"
        finish(full, runs["fsdp.log"])
        runs["stopped.log"] = root / "stopped.log"
        finish(stopping, runs["stopped.log"], codes=(1, 128 + signal.SIGTERM))
    shutil.copytree(runs["resumed"], runs["stopped"])
    resume = start(argv(shards, runs["resumed"], strategy="fsdp", resume=True, **OPTIONS), root / "resumed.log",
                   launcher=two)
    finish(resume, root / "resumed.log")
    return runs


def test_fsdp_two_processes_equal_one(fsdp_runs) -> None:
    one, fsdp = train_losses(fsdp_runs["one"]), train_losses(fsdp_runs["fsdp"])
    assert sorted(fsdp) == sorted(one) == list(range(1, 9)), fsdp_runs["fsdp.log"].read_text()[-4000:]
    for step in one:
        assert fsdp[step] == pytest.approx(one[step], rel=1e-5), step
    a, b = weights(fsdp_runs["one"]), weights(fsdp_runs["fsdp"])  # the last checkpoint holds the whole weights
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=WEIGHTS_ATOL, rtol=0, msg=name)
    # ... and the shards they were gathered from, put together in this process, are the same
    shards = sharded_weights(fsdp_runs["fsdp"] / "checkpoint" / SHARDED)
    assert shards.keys() == b.keys() and all(torch.equal(shards[k], b[k]) for k in b)


def test_fsdp_resume_after_sigterm_equals_uninterrupted(fsdp_runs) -> None:
    stopped = fsdp_runs["stopped"]
    assert f"stopped by SIGTERM at step {STOP_AT} of 8" in fsdp_runs["stopped.log"].read_text(errors="replace")
    assert checkpoint_step(stopped) == STOP_AT
    names = {p.name for p in (stopped / "checkpoint").iterdir()}
    assert SHARDED in names and WEIGHTS not in names  # a checkpoint before the last one: shards only
    assert len(list((stopped / "checkpoint" / SHARDED).glob("*.distcp"))) == 2  # one file per process
    assert_same_run(fsdp_runs["fsdp"], fsdp_runs["resumed"], 8)  # metrics and weights exactly equal


def test_fsdp_resumes_on_another_number_of_processes(fsdp_runs, shards, tmp_path, train_tiny) -> None:  # noqa: F811
    """The shards of two processes, read back by one (torch.distributed.checkpoint reshards them)."""
    run = tmp_path / "run"
    shutil.copytree(fsdp_runs["stopped"], run)
    try:
        assert train_tiny.main(argv(shards, run, strategy="fsdp", resume=True, **OPTIONS))["step"] == 8
    finally:
        dist.destroy_process_group()
    one, resumed = train_losses(fsdp_runs["fsdp"]), train_losses(run)
    for step in one:
        assert resumed[step] == pytest.approx(one[step], rel=1e-5), step
    a, b = weights(fsdp_runs["fsdp"]), weights(run)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=WEIGHTS_ATOL, rtol=0, msg=name)


def test_fsdp_shards_consolidate_to_a_normal_checkpoint(fsdp_runs, tmp_path) -> None:
    """Step 4's shards (the stopped run's checkpoint.prev) make a checkpoint equal to one process's at step 4."""
    sharded = fsdp_runs["stopped"] / "checkpoint.prev"
    out = lmforge.consolidate(sharded, tmp_path / "consolidated")
    assert {p.name for p in out.iterdir()} == {"config.json", WEIGHTS, "tokenizer.json", "lmforge.json"}
    expected = load_file(fsdp_runs["one"] / "checkpoint.prev" / WEIGHTS)
    got = load_file(out / WEIGHTS)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=WEIGHTS_ATOL, rtol=0, msg=name)
    prompt = dict(prompt="Shall I compare thee", max_new_tokens=8, temperature=0)
    text = lmforge.load(out).generate(**prompt)
    assert text == lmforge.load(sharded).generate(**prompt)  # a sharded checkpoint loads as it is, too
    assert text == lmforge.load(fsdp_runs["one"] / "checkpoint.prev").generate(**prompt)
    with pytest.raises(UserError, match="holds no FSDP shards"):
        lmforge.consolidate(out, tmp_path / "again")


def test_fsdp_bad_settings_are_one_line_errors(shards, tmp_path, train_tiny) -> None:  # noqa: F811
    with pytest.raises(UserError, match="fp16.*does not work with train.strategy = 'fsdp'"):
        TrainConfig(strategy="fsdp", precision="fp16").validate()
    with pytest.raises(UserError, match="muon.*does not work with train.strategy = 'fsdp'"):
        TrainConfig(strategy="fsdp", optimizer="muon").validate()
    with pytest.raises(UserError, match="train.strategy = 'zero'; expected ddp or fsdp"):
        TrainConfig(strategy="zero").validate()
    # one process with fsdp: a process group of one, sharded checkpoints; resumed as ddp: refused
    run = tmp_path / "run"
    try:
        train_tiny.main(argv(shards, run, strategy="fsdp", max_steps=3, eval_interval=2))
        assert (run / "checkpoint.prev" / SHARDED).is_dir() and (run / "checkpoint" / WEIGHTS).is_file()
        with pytest.raises(UserError, match="train.strategy = 'fsdp'; resume it with the same strategy"):
            train_tiny.main(argv(shards, run, max_steps=4, resume=True))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_equal_one_process(shards, tmp_path, train_tiny) -> None:  # noqa: F811
    """Two torchrun launchers, one process each, meet at a c10d rendezvous as two nodes would."""
    options = dict(OPTIONS, max_steps=5, eval_interval=5)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for rank in (0, 1):
        launcher = [*TORCHRUN, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
                    "--rdzv-conf", f"is_host={int(rank == 0)}", "--local-addr", "127.0.0.1"]
        nodes.append(start(argv(shards, tmp_path / "nodes", **options), tmp_path / f"node{rank}.log", launcher))
    try:
        train_tiny.main(argv(shards, tmp_path / "one", **options))
    finally:
        logs = [finish(node, tmp_path / f"node{rank}.log") for rank, node in enumerate(nodes)]
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "nodes")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4, 5], logs[0][-4000:]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    a, b = weights(tmp_path / "one"), weights(tmp_path / "nodes")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=WEIGHTS_ATOL, rtol=0, msg=name)
