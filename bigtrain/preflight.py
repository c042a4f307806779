"""Checks that need neither the model nor the data, run before any heavy import or work.

``bigtrain train`` calls ``preflight`` right after parsing the config, before importing DeepSpeed,
transformers or datasets, so a bad DeepSpeed JSON, fp16 on a CPU machine, a ``model.path`` that
is not a model or a resume that cannot work fails in seconds, not after minutes of tokenizing and
model building (docs/bad_inputs.md has the timings).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from bigtrain import checkpoint
from bigtrain.config import Config, ConfigError
from bigtrain.engine import resolve_ds_config, zero_stage


def check_stage(saved: checkpoint.TrainState, stage: int, path: Path) -> None:
    """What a resume cannot change: the ZeRO stage (another number of ranks is converted through
    DeepSpeed's universal checkpoint, see checkpoint.load_resume)."""
    if saved.zero_stage and saved.zero_stage != stage:
        raise ConfigError(
            f"--resume {path}: saved with ZeRO-{saved.zero_stage}, now ZeRO-{stage}: the optimizer partitions of "
            f"one stage cannot be loaded by another: relaunch with train.deepspeed=zero{saved.zero_stage} "
            "(or a JSON with that stage)")


def check_resume(cfg: Config, saved: checkpoint.TrainState, stage: int, path: Path, world: int) -> None:
    """What a resume from ``path`` (its state ``saved``) on ``world`` ranks cannot do."""
    if saved.fingerprint != cfg.fingerprint():
        raise ConfigError(f"--resume {path}: it belongs to another model/data/seed (fingerprint "
                          f"{saved.fingerprint} != {cfg.fingerprint()}): resume with the config it was "
                          "trained with (RUN_DIR/config.yaml)")
    check_stage(saved, stage, path)
    check_skip_steps(cfg, saved)
    checkpoint.check_inline_conversion(path, saved, world, cfg.checkpoint.convert_inline_max_gb)


def check_skip_steps(cfg: Config, state: checkpoint.TrainState) -> None:
    """A ``train.skip_steps`` range that starts at or before the step the run resumes from, and that the
    run has not applied, would never be reached: refuse it rather than ignore it (before anything is
    loaded, and before newer checkpoints are set aside)."""
    late = [r for r in cfg.train.skip_steps if r[0] <= state.progress.step and r not in state.history.manual_skips]
    if late:
        raise ConfigError(f"train.skip_steps {late}: the run starts at step {state.progress.step}, so a range must "
                          f"start at step {state.progress.step + 1} or later; to skip the data after the checkpoint, "
                          f"use train.skip_steps=[[{state.progress.step + 1},LAST]]")


def check_attention(cfg: Config) -> None:
    """flash_attention_2 needs CUDA, a 16-bit dtype and the flash_attn package; transformers would
    otherwise fail inside from_pretrained, after the data was prepared."""
    if cfg.model.attn_implementation != "flash_attention_2":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA GPU and none is visible: "
                          "use model.attn_implementation=sdpa on this machine")
    if cfg.train.precision not in ("bf16", "fp16"):
        raise ConfigError(f"model.attn_implementation=flash_attention_2 runs in bf16 or fp16, not "
                          f"train.precision={cfg.train.precision}: set train.precision=bf16, or use sdpa")
    if importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash_attn package: "
                          "pip install flash-attn --no-build-isolation, or use model.attn_implementation=sdpa")


def check_compile(cfg: Config, stage: int) -> None:
    """model.compile: inductor needs a compiler at run time, and under ZeRO-3 it would compile nothing
    worth having. Without these checks the run fails (or crawls) at its first forward, after the data,
    the model and the engine were built."""
    if not cfg.model.compile:
        return
    if stage == 3:
        raise ConfigError("model.compile=true under ZeRO-3: DeepSpeed's parameter hooks on every submodule "
                          "(compiler-disabled, runtime/zero/parameter_offload.py) break each compiled layer into "
                          "small graphs, so little is fused: set model.compile=false, or train with ZeRO-1/2")
    import torch

    if torch.cuda.is_available():
        if importlib.util.find_spec("triton") is None:
            raise ConfigError("model.compile=true on CUDA needs the triton package (inductor writes Triton "
                              "kernels): pip install triton, or set model.compile=false")
        if not (shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")):
            raise ConfigError("model.compile=true on CUDA needs a C compiler (cc or gcc on PATH: Triton builds "
                              "its kernel launchers): install one, or set model.compile=false")
    elif not (shutil.which("c++") or shutil.which("g++")):
        raise ConfigError("model.compile=true on CPU needs a C++ compiler (c++ or g++ on PATH: inductor "
                          "builds its CPU kernels): install one, or set model.compile=false")


def preflight(cfg: Config, world: int, resume: str | None) -> None:
    """Raise ConfigError/ValueError naming the problem and the fix; reads only small files."""
    stage = zero_stage(resolve_ds_config(cfg, world))  # JSON validity, contradictions, fp16 without a GPU
    check_attention(cfg)
    check_compile(cfg, stage)
    if cfg.model.path is not None and not (Path(cfg.model.path) / "config.json").is_file():
        raise ConfigError(f"model.path={cfg.model.path!r} is not a Hugging Face model directory (no config.json): "
                          "point it at a save_pretrained folder or set model.path=null to use a preset")
    if resume is None:
        return
    root = Path(cfg.run_dir) / "checkpoints"
    if resume == "auto":  # quietly: prepare_run_dir reports the checkpoints it passes over
        path = next((p for p in reversed(checkpoint.complete_checkpoints(root)) if checkpoint.verify(p) is None), None)
    else:
        path = checkpoint.resolve_resume(resume, root)
    if path is not None:
        check_resume(cfg, checkpoint.read_state(path), stage, path, world)
