"""model.compile: each decoder layer is torch.compiled in place. The compiled model trains the same
losses as the eager one (to inductor's float tolerance), also with activation checkpointing, and its
checkpoints load into an eager run; what cannot work is refused before any work."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY, read_jsonl, run_bigtrain


def _tiny_llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, use_cache=False)
    model = LlamaForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _graph_breaks(model, compile_fn) -> int:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compile_fn(model)
    ids = torch.randint(0, 64, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    return sum(counters["graph_break"].values())


def test_layers_compile_whole_under_activation_checkpointing():
    """Checkpointing inside a compiled graph breaks it (the control, torch's default); compile_layers
    compiles each layer, checkpoint included, with nothing broken out."""
    from bigtrain.engine import compile_layers

    import torch._dynamo.config as dynamo_config

    model = _tiny_llama()
    with dynamo_config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False):
        assert _graph_breaks(model, lambda m: m.compile(backend="eager")) > 0
    model = _tiny_llama()
    compiled = []
    assert _graph_breaks(model, lambda m: compiled.append(compile_layers(m, backend="eager"))) == 0
    assert compiled == [2]
    assert [n for n, _ in _tiny_llama().named_parameters()] == [n for n, _ in model.named_parameters()]


def test_compile_is_refused_where_it_cannot_help_or_run(monkeypatch):
    from bigtrain import preflight
    from bigtrain.config import ConfigError, load_config

    cfg = load_config(None, ["model.compile=true", "train.deepspeed=zero3"])
    with pytest.raises(ConfigError, match="model.compile=true under ZeRO-3"):
        preflight.preflight(cfg, 1, None)
    cfg = load_config(None, ["model.compile=true"])
    monkeypatch.setattr(preflight.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        preflight.preflight(cfg, 1, None)
    monkeypatch.undo()
    preflight.preflight(cfg, 1, None)  # this machine has one


@pytest.mark.slow
def test_compiled_run_matches_eager_and_its_checkpoint_resumes_eagerly(tmp_path, data_cache):
    common = [*TINY, f"data.cache_dir={data_cache}", "train.steps=6", "checkpoint.interval=3",
              "checkpoint.snapshot_interval=0"]
    proc = run_bigtrain([*common, f"run_dir={tmp_path / 'c'}", "model.compile=true",
                         "model.activation_checkpointing=true"], nproc=1, timeout=400)
    assert "model.compile: 2 decoder layers compiled" in proc.stderr
    run_bigtrain([*common, f"run_dir={tmp_path / 'e'}"], nproc=1)
    run_bigtrain([*common, f"run_dir={tmp_path / 'r'}", "--resume",
                  str(tmp_path / "c" / "checkpoints" / "step_00000003")], nproc=1)
    compiled = [r["loss"] for r in read_jsonl(tmp_path / "c" / "metrics.jsonl")]
    eager = [r["loss"] for r in read_jsonl(tmp_path / "e" / "metrics.jsonl")]
    resumed = [r["loss"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl")]
    assert len(compiled) == len(eager) == 6 and len(resumed) == 3
    assert compiled == pytest.approx(eager, rel=1e-3)
    assert resumed == pytest.approx(compiled[3:], rel=1e-3)


def test_compiled_moe_layers_keep_the_router_loss_under_checkpointing():
    """A mixture-of-experts model's auxiliary (router) loss is collected by transformers' output
    capturing, the side effect compile_layers lets the recompute skip: it must come out unchanged."""
    import copy

    from transformers import MixtralConfig, MixtralForCausalLM

    from bigtrain.engine import compile_layers

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                        max_position_embeddings=64, use_cache=False)
    eager = MixtralForCausalLM(cfg)
    eager.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    eager.train()
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled, backend="eager") == 2
    ids = torch.randint(0, 64, (2, 16))
    a, b = eager(input_ids=ids, labels=ids), compiled(input_ids=ids, labels=ids)
    a.loss.backward()
    b.loss.backward()
    assert a.aux_loss is not None and torch.allclose(a.aux_loss, b.aux_loss)
    assert torch.allclose(a.loss, b.loss)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
