"""``bigtrain export`` at any size: the model skeleton is built on meta in the output dtype and the
ZeRO checkpoint is read lazily, so the weights exported are the fp32 consolidation cast to the output
dtype without a second (randomly initialised) fp32 model or a full fp32 state dict in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import TINY, run_bigtrain


def save_tied_tiny_model(path: Path) -> Path:
    """A tiny-llama model directory whose lm_head is tied to embed_tokens."""
    from transformers import AutoModelForCausalLM

    from bigtrain.config import ModelConfig
    from bigtrain.data import build_tokenizer
    from bigtrain.model import preset_config

    tok = build_tokenizer(None)
    config = preset_config(ModelConfig(), len(tok), 32, tok.pad_token_id)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow  # ~30 s: a real 1-rank training run (data preparation included) before the export
def test_export_bf16_is_the_cast_fp32_consolidation_built_on_meta_from_a_lazy_read(tmp_path, data_cache,
                                                                                    monkeypatch):
    import deepspeed.utils.zero_to_fp32 as z2f
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from bigtrain import export as export_mod

    model_dir = save_tied_tiny_model(tmp_path / "m")
    run_dir = tmp_path / "run"
    run_bigtrain([*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", f"model.path={model_dir}",
                  "train.deepspeed=zero2", "train.steps=2", "train.precision=fp32",
                  "checkpoint.snapshot_interval=0"], nproc=1)
    ckpt = run_dir / "checkpoints" / "step_00000002"
    reference = z2f.get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)

    # How the export builds its model and reads the checkpoint, seen from outside.
    skeletons, reads = [], []
    from_config = export_mod.AutoModelForCausalLM.from_config
    read = z2f.get_fp32_state_dict_from_zero_checkpoint

    def spy_from_config(*args, **kwargs):
        model = from_config(*args, **kwargs)
        skeletons.append(({p.device.type for p in model.parameters()}, {p.dtype for p in model.parameters()},
                          {b.device.type for b in model.buffers()}))
        return model

    def spy_read(*args, **kwargs):
        reads.append(kwargs.get("lazy_mode", False))
        return read(*args, **kwargs)

    monkeypatch.setattr(export_mod.AutoModelForCausalLM, "from_config", spy_from_config)
    monkeypatch.setattr(z2f, "get_fp32_state_dict_from_zero_checkpoint", spy_read)
    out = export_mod.export(ckpt, tmp_path / "hf", "bfloat16")
    monkeypatch.undo()

    # (c) no full-size model was allocated (or randomly initialised) and no full fp32 state dict read:
    # the old export built an fp32 model on the CPU and consolidated everything eagerly.
    assert skeletons == [({"meta"}, {torch.bfloat16}, {"cpu"})], skeletons
    assert reads == [True], "the checkpoint must be read lazily (lazy_mode=True), one tensor at a time"

    # ZeRO-2 (the default stage, this checkpoint's) too: DeepSpeed's lazy_mode alone would hand out views
    # of one full fp32 vector it concatenated from the partitions.
    lazy = export_mod.read_lazily(ckpt)
    assert set(lazy) == set(reference) and not [n for n, v in lazy.items() if isinstance(v, torch.Tensor)]
    del lazy

    # (a) every exported tensor is the fp32 consolidation cast to bf16, bit for bit.
    exported = {}
    for f in out.glob("*.safetensors"):
        exported.update(load_file(f))
    assert exported and set(exported) <= set(reference)
    for name, tensor in exported.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name

    # (b) it loads, every weight has a value, and the tied lm_head is the embedding.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, reference["model.embed_tokens.weight"].to(model.dtype))
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]


def test_lazy_concatenation_copies_out_exactly_the_slice_torch_cat_would_give():
    """The deferred ``torch.cat`` that keeps a ZeRO-1/2 read from allocating the full fp32 vector:
    slices that start, end and span anywhere across the rank partitions equal the real ones and own
    exactly their storage."""
    from bigtrain.export import _TorchWithLazyCat

    parts = [torch.randn(n) for n in (7, 1, 12, 5)]
    real = torch.cat(parts)
    lazy = _TorchWithLazyCat(torch).cat(parts, 0)
    assert lazy.numel() == real.numel()
    for start in range(real.numel()):
        for length in range(real.numel() - start + 1):
            got = lazy.narrow(0, start, length).contiguous()
            assert torch.equal(got, real.narrow(0, start, length))
            assert got.untyped_storage().nbytes() == length * got.element_size()
    assert torch.equal(lazy.narrow(0, 3, 12).view(3, 4).contiguous(), real.narrow(0, 3, 12).view(3, 4))
    assert torch.equal(lazy.narrow(0, 2, 20).narrow(0, 4, 6).contiguous(), real[6:12])
    with pytest.raises(IndexError):
        lazy.narrow(0, 20, 6)
    # Anything but flat partitions along dim 0 is left to torch.
    assert torch.equal(_TorchWithLazyCat(torch).cat([torch.ones(2, 2)] * 2, 1), torch.ones(2, 4))
