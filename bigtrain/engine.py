"""DeepSpeed: resolve the JSON config against the bigtrain config, build the engine, set hyper-parameters."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from bigtrain.config import Config, ConfigError, OptimConfig

# Installed from a wheel: bigtrain/ds_configs (package data); from a source checkout: the repo's ds_configs/.
DS_CONFIG_DIR = next((d for d in (Path(__file__).resolve().parent / "ds_configs",
                                  Path(__file__).resolve().parent.parent / "ds_configs") if d.is_dir()),
                     Path(__file__).resolve().parent / "ds_configs")
_AUTO = "auto"
log = logging.getLogger("bigtrain")


def ds_config_path(name: str) -> Path:
    """A shipped config name (``zero2``) or a path to a JSON file."""
    shipped = DS_CONFIG_DIR / f"{name}.json"
    if shipped.is_file():
        return shipped
    path = Path(name)
    if path.is_file():
        return path
    names = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
    raise ConfigError(f"train.deepspeed={name!r} is neither a shipped config {names} nor an existing JSON file")


def use_torch_adam(optim: OptimConfig) -> bool:
    if optim.torch_adam == "auto":
        # torch's AdamW everywhere: DeepSpeed's FusedAdam is a JIT build that needs nvcc on the user's
        # machine at run time (and a slow C++ build on CPU); on CUDA torch's own fused kernel is used.
        return True
    return optim.torch_adam


def resolve_ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """Fill every ``"auto"`` from the bigtrain config. An explicit value that disagrees with the bigtrain
    config is an error, never silently overridden (the HF Trainer overrides; users lose hours to it)."""
    path = ds_config_path(cfg.train.deepspeed)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc}): fix the file or pick a shipped one (train.deepspeed=zero2)")
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    ds = copy.deepcopy(ds)
    t, o = cfg.train, cfg.optim
    for key in ("scheduler",):
        if key in ds:
            raise ConfigError(f"{path}: remove {key!r}: bigtrain owns the LR schedule (optim.warmup_steps, optim.min_lr)")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 1, 2 or 3, got {stage!r}")

    def fill(node: dict, key: str, value: Any, source: str) -> None:
        current = node.get(key, _AUTO)
        if current == _AUTO:
            node[key] = value
        elif current != value and not (isinstance(value, float) and isinstance(current, (int, float))
                                       and math.isclose(current, value, rel_tol=1e-12)):
            raise ConfigError(f"{path.name}: {key}={current!r} contradicts {source}={value!r}: "
                              f'set it to "auto" or change {source}')

    fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch, "train.micro_batch")
    fill(ds, "gradient_accumulation_steps", t.grad_accum, "train.grad_accum")
    fill(ds, "train_batch_size", t.micro_batch * t.grad_accum * world_size, "train.micro_batch*grad_accum*ranks")
    fill(ds, "gradient_clipping", float(o.grad_clip), "optim.grad_clip")
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        raise ConfigError(f"{path.name}: optimizer.type={opt.get('type')!r} is not supported: use AdamW")
    params = opt.setdefault("params", {})
    fill(params, "lr", o.lr, "optim.lr")
    fill(params, "betas", [o.beta1, o.beta2], "optim.beta1/beta2")
    fill(params, "eps", o.eps, "optim.eps")
    fill(params, "weight_decay", o.weight_decay, "optim.weight_decay")
    fill(params, "torch_adam", use_torch_adam(o), "optim.torch_adam")
    if params["torch_adam"] and torch.cuda.is_available():
        params.setdefault("fused", True)  # torch.optim.AdamW(fused=True): prebuilt, no compiler
    if str(opt["type"]).lower() == "adamw":
        params.setdefault("adam_w_mode", True)
    for prec in ("bf16", "fp16"):
        fill(ds.setdefault(prec, {}), "enabled", t.precision == prec, "train.precision")
    if t.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a GPU (DeepSpeed refuses fp16 on CPU): use bf16 or fp32 here")
    return ds


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config["zero_optimization"]["stage"])


def build_engine(cfg: Config, model: torch.nn.Module, world_size: int, ds_config: dict[str, Any] | None = None,
                 local_world: int = 1):
    """``ds_config``: the resolved config the model was built with (ZeRO-3 builds it partitioned);
    ``local_world``: ranks on this node (they share its cores when compiling)."""
    import deepspeed

    ds_config = ds_config if ds_config is not None else resolve_ds_config(cfg, world_size)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    if cfg.model.compile:
        compile_layers(engine.module, local_world)
    return engine, ds_config


def compile_layers(model: torch.nn.Module, local_world: int = 1, **compile_kwargs) -> int:
    """``torch.compile`` every decoder layer in place (``nn.Module.compile``: parameter names, hence
    checkpoints, are unchanged); returns how many. Per layer, as torchtitan compiles its blocks: the
    layers share one code object, so the compilation is done once and reused (a whole-model graph
    grows with depth). Inductor's compile workers are the process's cores shared by the node's
    ``local_world`` ranks (``TORCHINDUCTOR_COMPILE_THREADS`` wins). Decoder layers are the modules
    transformers derives from ``GradientCheckpointingLayer``; a model without any is compiled whole."""
    import torch._inductor.config
    from transformers.modeling_layers import GradientCheckpointingLayer

    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:  # inductor's default: min(32, cores) per rank
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch._inductor.config.compile_threads = max(1, min(32, cores // max(1, local_world)))
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if any(getattr(m, "gradient_checkpointing", False) for m in layers):
        # transformers >= 5.2x checkpoints inside ``forward``: dynamo then traces the checkpoint, and the
        # forward's one side effect (output_capturing's context variable, bookkeeping for requested
        # hidden states, which a recompute must not redo anyway) broke the layer out of the graph.
        import torch._dynamo.config as dynamo_config

        if hasattr(dynamo_config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
            dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in layers or [model]:
        layer.compile(**compile_kwargs)
    log.info("model.compile: %s compiled (torch.compile; the first step and the first eval compile)",
             f"{len(layers)} decoder layers" if layers else "the whole model")
    return len(layers)


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Warmup then cosine to ``min_lr`` at ``optim.decay_steps`` (0: ``total_steps``), then flat: a
    pure function of the step, so resume and rollback need no scheduler state. ``step`` counts
    optimizer steps already taken (the LR of the next update)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / (optim.warmup_steps + 1)
    decay_steps = max(1, (optim.decay_steps or total_steps) - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))


def set_hparams(engine, lr: float, eps: float, beta2: float, *, beta1: float, weight_decay: float) -> None:
    """Set every optimizer hyper-parameter on the optimizer DeepSpeed actually steps. Called every
    step (lr) and after every load: ``optimizer.load_state_dict`` restores the saved lr, eps, betas and
    weight decay (OPT-175B lost a betas change this way, metaseq chronicles 27_percent_update.md)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
        group["eps"] = eps
        group["betas"] = (beta1, beta2)
        group["weight_decay"] = weight_decay


def optimizer_hparams(engine) -> dict[str, float]:
    """lr, eps, beta1, beta2, weight_decay as the optimizer DeepSpeed steps holds them (first group;
    ``check_hparams`` proves all groups agree with the intended values)."""
    group = engine.optimizer.param_groups[0]
    return {"lr": group["lr"], "eps": group["eps"], "beta1": group["betas"][0], "beta2": group["betas"][1],
            "weight_decay": group["weight_decay"]}


def check_hparams(engine, eps: float, beta2: float, *, beta1: float, weight_decay: float) -> None:
    intended = {"eps": eps, "beta1": beta1, "beta2": beta2, "weight_decay": weight_decay}
    for group in engine.optimizer.param_groups:
        actual = {"eps": group["eps"], "beta1": group["betas"][0], "beta2": group["betas"][1],
                  "weight_decay": group["weight_decay"]}
        if actual != intended:
            raise RuntimeError(f"optimizer hyper-parameters {actual} != intended {intended}")


def loss_scale(engine) -> float | None:
    """fp16's current dynamic loss scale (None without one: bf16/fp32 use a static scale of 1)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return float(scaler.cur_scale) if getattr(scaler, "dynamic", False) else None


def keep_loss_scale(engine, scale: float | None) -> None:
    """After a rollback's load: keep the loss scale found so far. DeepSpeed's load replaces the
    scaler with the saved one (runtime/zero/stage_1_and_2.py ``load_state_dict``: ``loss_scaler``),
    so a rollback to step 0 of an fp16 run would redo the same overflows that calibrated the scale,
    and meet the same "DeepSpeed skipped N consecutive steps" incident again. The scale is what was
    learned about the run, like eps, not progress."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scale is not None and getattr(scaler, "dynamic", False):
        scaler.cur_scale = scale


def lr_multiplier(cfg: Config, state) -> float:
    """The rollback LR multiplier now: ``history.lr_scale`` right after the rollback, back to 1 linearly
    over ``spike.lr_cooldown_steps`` (0: it stays). ``state``: a bigtrain.checkpoint.TrainState."""
    h, cooldown = state.history, cfg.spike.lr_cooldown_steps
    if h.lr_scale >= 1.0 or cooldown == 0:
        return h.lr_scale
    progress = min(1.0, max(0, state.progress.step - h.lr_scale_step) / cooldown)
    return h.lr_scale + (1.0 - h.lr_scale) * progress


def lr_for(cfg: Config, state) -> float:
    """The LR of the next update: the schedule (a pure function of the step) x the rollback multiplier."""
    return lr_at(state.progress.step, cfg.optim, cfg.train.steps) * lr_multiplier(cfg, state)


def apply_hparams(cfg: Config, engine, state, check: bool = False) -> float:
    """Every optimizer hyper-parameter of the next update: lr from the schedule and the rollback
    multiplier, eps/beta2 from the run's history (recovery changes them), beta1 and weight decay from
    the config (a resume with a new value applies it). ``check``: read them back from the optimizer
    (after a load, which restores the saved ones). Returns the lr."""
    h, o = state.history, cfg.optim
    lr = lr_for(cfg, state)
    set_hparams(engine, lr, h.eps, h.beta2, beta1=o.beta1, weight_decay=o.weight_decay)
    if check:
        check_hparams(engine, h.eps, h.beta2, beta1=o.beta1, weight_decay=o.weight_decay)
    return lr


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T] next-token cross-entropy of every position (0 where the label is -100 or past the end).

    The same computation as transformers' ForCausalLMLoss (loss_utils.py: logits upcast to float32,
    labels shifted by padding, ignore_index -100), kept per token instead of summed, so the step's loss
    and every sample's loss come from one cross-entropy: no second pass over the logits. Memory is
    HF's own: the float32 copy of the logits (4 bytes x vocab per token: 0.5 MB at a 128k vocab, which
    autograd keeps for the backward) is the one HF's loss makes too; the per-token result adds 4
    bytes per token."""
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    flat = logits.float().reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(flat, shift.reshape(-1).to(flat.device), ignore_index=-100,
                                             reduction="none").view(shift.shape)
