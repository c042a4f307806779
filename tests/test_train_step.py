"""In-process unit tests of the training step's loss: per-sample slots, the model's own loss, MoE aux."""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist

from bigtrain.config import ConfigError, FaultConfig
from bigtrain.faults import FaultInjector
from bigtrain.train import check_loss_function, token_losses, train_step


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_token_losses_mean_is_the_models_own_loss():
    model = tiny_llama()
    x = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    labels = x.clone()
    labels[0, :5] = -100  # prompt masking
    labels[2, 7:] = -100
    out = model(input_ids=x, labels=labels)
    tl = token_losses(out.logits, labels)
    count = (labels[:, 1:] != -100).sum()
    assert torch.allclose(tl.sum() / count, out.loss, rtol=1e-5, atol=1e-6)
    assert (tl[0, :4] == 0).all() and (tl[:, -1] == 0).all()  # ignored and past-the-end positions


def test_a_model_with_another_loss_is_refused():
    model = tiny_llama()
    check_loss_function(model)  # transformers' default causal-LM loss: fine
    model.loss_function = lambda *a, **k: torch.zeros(())
    with pytest.raises(ConfigError, match="loss_function"):
        check_loss_function(model)


class FakeEngine:
    """Just enough of a DeepSpeed engine for train_step: logits chosen per sample, backward recorded."""

    device = torch.device("cpu")

    def __init__(self, vocab: int = 8, aux: float | None = None, coef: float = 0.0):
        self.vocab, self.aux, self.backwards = vocab, aux, []
        self.module = types.SimpleNamespace(config=types.SimpleNamespace(router_aux_loss_coef=coef))
        self.w = torch.zeros((), requires_grad=True)

    def __call__(self, input_ids, **kwargs):
        # Row r's logits are uniform scaled by its first token: sample loss depends on its own tokens only.
        b, t = input_ids.shape
        logits = (input_ids[:, :1, None].float() * 0.1 + self.w) * torch.arange(self.vocab).float()
        out = types.SimpleNamespace(logits=logits.expand(b, t, self.vocab))
        if self.aux is not None:
            out.aux_loss = torch.tensor(self.aux) + self.w
        return out

    def backward(self, loss):
        self.backwards.append(float(loss.detach()))

    def step(self):
        pass

    def get_global_grad_norm(self):
        return 1.0


def test_train_step_puts_each_sample_loss_in_its_slot(one_rank):
    # Rank 1 of 3 (slots 4..7 of a global batch of 12), 2 micro-batches of 2 samples each.
    engine = FakeEngine()
    xs = [torch.tensor([[1, 2, 3], [5, 1, 1]]), torch.tensor([[7, 0, 0], [3, 3, 3]])]
    batches = [{"input_ids": x, "labels": x} for x in xs]
    out = train_step(engine, batches, 4.0, FaultInjector(FaultConfig(), 0), first_slot=4, global_batch=12)
    per_sample = out[4:]
    expected = torch.cat([token_losses(engine(x).logits, x).sum(1) for x in xs])
    assert torch.allclose(per_sample[4:8], expected) and (expected > 0).all()
    assert (per_sample[:4] == 0).all() and (per_sample[8:] == 0).all()
    assert torch.allclose(out[0], expected.sum())  # loss_sum: the same cross-entropy


def test_train_step_adds_the_moe_aux_loss_to_the_gradient_not_the_reported_loss(one_rank):
    x = torch.tensor([[1, 2, 3], [5, 1, 1]])
    dense = FakeEngine()
    moe = FakeEngine(aux=2.5, coef=0.02)
    a = train_step(dense, [{"input_ids": x, "labels": x}], 4.0, FaultInjector(FaultConfig(), 0), global_batch=2)
    b = train_step(moe, [{"input_ids": x, "labels": x}], 4.0, FaultInjector(FaultConfig(), 0), global_batch=2)
    assert moe.backwards[0] == pytest.approx(dense.backwards[0] + 0.02 * 2.5)
    assert torch.equal(a, b)  # loss sums and per-sample losses: cross-entropy only


def test_label_counts_per_sample_match_the_global_count():
    import numpy as np

    from bigtrain.data import LABEL, PackedData

    rng = np.random.default_rng(0)
    flags = (rng.random((20, 9)) < 0.6).astype(np.uint8) * LABEL
    data = types.SimpleNamespace(train=torch.zeros(20, 9, dtype=torch.long), train_flags=flags)
    ids = [3, 17, 3, 0]
    counts = PackedData.label_counts(data, ids)
    assert counts == [float((flags[i, 1:] & LABEL != 0).sum()) for i in ids]
    assert sum(counts) == PackedData.label_count(data, ids)  # the step's normaliser, from the same read
    assert PackedData.label_counts(types.SimpleNamespace(train=data.train, train_flags=None), ids) == [8.0] * 4
