"""Shared test helpers: run bigtrain in 1 or 2 real processes (gloo on CPU) with tiny settings, a fake
engine for checkpoint-store tests, a tiny model directory. Imported by the tests (``from helpers
import ...``); conftest.py holds only fixtures."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

BIN = Path(sys.executable).parent

# Tiny but real: the built-in tokenizer, a 2-layer Llama, the stdlib corpus (first 200 kB).
TINY = ["data.max_bytes=200000", "data.seq_len=32", "train.micro_batch=2", "train.eval_interval=0",
        "train.eval_batches=2", "optim.warmup_steps=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bigtrain(args: list[str], nproc: int = 2, timeout: int = 300, check: bool = True,
                 extra_env: dict | None = None, script: str | None = None) -> subprocess.CompletedProcess:
    """``bigtrain train ARGS`` on ``nproc`` ranks; ``script``: a Python file run instead of
    ``-m bigtrain`` that takes ``train ARGS`` the same way (a test's patched entry point)."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PATH": f"{BIN}:{os.environ['PATH']}",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    entry = [script] if script else ["-m", "bigtrain"]
    if nproc == 1:
        cmd = [sys.executable, *entry, "train", *args]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
               *entry, "train", *args]
    # A session of its own, so a timeout kills torchrun's workers too, never leaving them behind.
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            raise AssertionError(f"{' '.join(cmd)} timed out after {timeout}s\n--- stderr\n{stderr[-8000:]}")
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class FakeEngine:
    """Writes one file per save whose content is the engine's weights, as DeepSpeed writes its partitions."""

    def __init__(self, weights: bytes):
        self.weights = weights

    def save_checkpoint(self, root, tag, client_state, save_latest):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(self.weights)


def save_tiny_model(path: Path, attention_dropout: float, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny-llama model directory (config, weights, tokenizer) as ``save_pretrained`` writes it."""
    from transformers import AutoModelForCausalLM

    from bigtrain.config import ModelConfig
    from bigtrain.data import build_tokenizer
    from bigtrain.model import preset_config

    tok = build_tokenizer(None)
    config = preset_config(ModelConfig(), len(tok), 32, tok.pad_token_id)
    config.attention_dropout = attention_dropout
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
