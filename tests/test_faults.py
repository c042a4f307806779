"""Fault injection of partial-batch poison (issue 14): which samples and documents become garbage."""

import pytest
import torch

from bigtrain.checkpoint import Progress
from bigtrain.config import FaultConfig
from bigtrain.faults import FaultInjector, poison_rows
from bigtrain.sampler import Sampler, SkipSet

# 12 blocks, documents: 0:[0,0] 1:[0,1] 2:[1,1] 3:[2,2] ... block b >= 2 is document b alone
DOCS = torch.tensor([[0, 0], [0, 1], [1, 1]] + [[d, d] for d in range(2, 11)])


def poison(cfg: FaultConfig, skips: SkipSet | None = None) -> tuple[FaultInjector, list[int]]:
    sampler = Sampler(12, seed=3)
    faults = FaultInjector(cfg, rank=0, train_docs=DOCS)
    faults.begin_step(Progress(), sampler, [], 8, 4, engine=None, skips=skips)
    drawn, _ = sampler.take(0, 16, (), skips)
    return faults, sampler.sample_ids(drawn)


def test_fraction_of_one_ranks_samples_and_their_documents():
    cfg = FaultConfig(poison_steps=[1, 2], poison_fraction=0.25, ranks=[1])
    state, ids = poison(cfg)
    chosen = [ids[4], ids[12]]  # rank 1's first sample in each of the two steps (4 per rank)
    assert {i for a, b in state.poisoned for i in range(a, b)} == set(chosen)
    # ground truth: only documents every block of which is garbage (a document sharing a chosen
    # block with clean blocks elsewhere is not bad data)
    touched = {d for b in chosen for d in range(int(DOCS[b, 0]), int(DOCS[b, 1]) + 1)}
    whole = {d for d in touched if {b for b in range(12) if DOCS[b, 0] <= d <= DOCS[b, 1]} <= set(chosen)}
    assert state.poisoned_docs == sorted(whole)


def test_block_poison_does_not_count_a_documents_clean_blocks_as_bad():
    # rank 0's share of step 1 is blocks [6, 8, 1, 4]; block 1 holds the tail of document 0 and the
    # head of document 1, whose other blocks (0 and 2) stay clean: they are not bad documents.
    state, ids = poison(FaultConfig(poison_steps=[1], poison_fraction=1.0, ranks=[0]))
    assert ids[:4] == [6, 8, 1, 4]
    assert {i for a, b in state.poisoned for i in range(a, b)} == {6, 8, 1, 4}
    assert state.poisoned_docs == [3, 5, 7]  # blocks 4, 6, 8: each a whole document


def test_poison_documents_spreads_to_every_block_of_them():
    cfg = FaultConfig(poison_steps=[1], poison_fraction=0.25, poison_documents=True)
    state, ids = poison(cfg)
    blocks = {i for a, b in state.poisoned for i in range(a, b)}
    for d in state.poisoned_docs:
        assert {b for b in range(12) if DOCS[b, 0] <= d <= DOCS[b, 1]} <= blocks
    assert {ids[0], ids[4]} <= blocks  # the first sample of each rank


def test_poison_rows_is_fixed_per_sample_id_and_skips_respected():
    x = torch.zeros(3, 5, dtype=torch.long)
    out = poison_rows(x.clone(), [7, 2, 9], [[2, 3], [9, 10]], vocab=50)
    assert out[0].eq(0).all() and not out[1].eq(0).all() and not out[2].eq(0).all()
    again = poison_rows(torch.zeros(1, 5, dtype=torch.long), [2], [[2, 3]], vocab=50)
    assert torch.equal(again[0], out[1])  # the same garbage whenever sample 2 is drawn
    # Shuffled: the block's own tokens in another order; repeated: one 8-token phrase; both fixed per id.
    text = torch.arange(100, 164).repeat(2, 1)
    shuffled = poison_rows(text.clone(), [2, 5], [[2, 3]], vocab=50, kind="shuffled")
    assert sorted(shuffled[0].tolist()) == text[0].tolist() != shuffled[0].tolist()
    assert torch.equal(shuffled[1], text[1])  # sample 5 is not poisoned
    assert torch.equal(poison_rows(text[:1].clone(), [2], [[2, 3]], 50, "shuffled")[0], shuffled[0])
    repeated = poison_rows(text[:1].clone(), [2], [[2, 3]], vocab=50, kind="repeated")[0]
    assert torch.equal(repeated, repeated[:8].repeat(8)) and repeated.max() < 50
    with pytest.raises(ValueError, match="poison_kind"):
        FaultConfig(poison_kind="zeros")
    # Poison picks among samples the run will draw: never an already skipped one.
    skips = SkipSet([0, 1, 2, 3])
    state, _ = poison(FaultConfig(poison_steps=[1]), skips)
    assert not {i for a, b in state.poisoned for i in range(a, b)} & {0, 1, 2, 3}


def test_poison_is_read_as_it_was_at_a_step_and_survives_a_checkpoint():
    """A block of a bad document read before the stretch that made it garbage was read clean: the
    rescore's control scores the samples as their step read them (``as_of``)."""
    state, ids = poison(FaultConfig(poison_steps=[1], poison_fraction=0.25, poison_documents=True))
    state.vocab = 50
    bad = [i for i in range(12) if any(a <= i < b for a, b in state.poisoned)]
    batch = lambda: {"input_ids": torch.zeros(len(bad), 5, dtype=torch.long),  # noqa: E731
                     "labels": torch.zeros(len(bad), 5, dtype=torch.long)}
    now = state.corrupt(batch(), bad)["input_ids"]
    assert not now.eq(0).all(dim=1).any()  # garbled now (arming step 1 and after)
    assert state.corrupt(batch(), bad, as_of=1)["input_ids"].equal(now)
    assert state.corrupt(batch(), bad, as_of=0)["input_ids"].eq(0).all()  # read clean before step 1
    restored = FaultInjector(FaultConfig(), rank=0, vocab=50)
    restored.load_state_dict(state.state_dict())
    assert restored.armed == state.armed and restored.corrupt(batch(), bad, as_of=0)["input_ids"].eq(0).all()
    # a state saved before steps were recorded: its poison reads garbled at any step (the safe side)
    older = FaultInjector(FaultConfig(), rank=0, vocab=50)
    older.load_state_dict({k: v for k, v in state.state_dict().items() if k != "armed"})
    assert older.corrupt(batch(), bad, as_of=0)["input_ids"].equal(now)


def test_static_poison_is_garbage_from_the_start_and_survives_a_loaded_state():
    """faults.poison_ids: bad data already in the corpus (a restarted benchmark run carries the poison
    its stopped leg met this way); documents wholly inside it are the ground truth."""
    docs = torch.tensor([[0, 0], [0, 1], [1, 1], [2, 2], [2, 2]])  # doc 1 spans blocks 1-2; doc 2 blocks 3-4
    inj = FaultInjector(FaultConfig(poison_ids=[[1, 3]]), 0, docs, vocab=50)
    assert inj.poisoned == [[1, 3]] and inj.poisoned_docs == [1]  # doc 0 also has clean block 0
    inj.load_state_dict({"fired": [], "poisoned": [[3, 5]], "poisoned_docs": [2], "armed": [[7, 3, 5]]})
    assert inj.poisoned == [[1, 5]] and inj.poisoned_docs == [1, 2]
    x = inj.corrupt({"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long)},
                    [1, 0], as_of=0)["input_ids"]
    assert not x[0].eq(0).all() and x[1].eq(0).all()  # garbage as of step 0: static poison is armed at 0
    with pytest.raises(ValueError, match="poison_ids"):
        FaultConfig(poison_ids=[[3, 3]])


PERSIST_SCRIPT = """
import sys, torch, deepspeed
from bigtrain.config import load_config
from bigtrain.data import build_tokenizer
from bigtrain.distributed import init_distributed, shutdown
from bigtrain.engine import build_engine, resolve_ds_config
from bigtrain.faults import corrupt_weights
from bigtrain.model import build_model
init_distributed()
out = {}
for stage, precision in ((1, "bf16"), (2, "bf16"), (2, "fp32"), (3, "bf16")):  # ZeRO-3 last: its Init lingers
    for persistent in (False, True):
        cfg = load_config(None, [f"model.path={sys.argv[1]}", f"train.deepspeed=zero{stage}", f"train.precision={precision}",
                                 "data.seq_len=8", "train.micro_batch=2", "optim.weight_decay=0", "optim.grad_clip=0"])
        ds = resolve_ds_config(cfg, 2)
        engine, _ = build_engine(cfg, build_model(cfg.model, build_tokenizer(cfg.model.path), 8, 0, ds), 2, ds)
        w = engine.module.get_output_embeddings().weight
        def full():
            with deepspeed.zero.GatheredParameters([w], enabled=stage == 3):
                return w.data.float().clone()
        before = full()
        mapping = getattr(w, "_hp_mapping", None)  # ZeRO-1/2: the slice of the weight this rank's master holds
        owned = torch.tensor([mapping.lp_fragment_address.numel if mapping is not None else 0])
        torch.distributed.all_gather(shares := [torch.zeros_like(owned) for _ in range(2)], owned)
        corrupt_weights(engine, 4.0, persistent)
        ids = torch.zeros(2, 8, dtype=torch.long)
        engine.backward(engine(input_ids=ids).logits.float().sum() * 0)  # zero gradients: Adam moves nothing
        engine.step()
        after = full()
        out[(stage, precision, persistent)] = [round(float((after / before)[before != 0].min()), 4),
                                    round(float((after / before)[before != 0].max()), 4),
                                    [int(x) for x in shares] if stage < 3 else None, w.numel() if stage < 3 else None]
        del engine
if torch.distributed.get_rank() == 0:  # one writer: two ranks' lines can interleave
    print(repr(out), flush=True)
shutdown(barrier=True)  # left to finalization, gloo's threads can abort a rank at exit (CI saw SIGABRT here)
"""


@pytest.mark.slow
def test_persistent_weight_corruption_survives_the_optimizer_step_on_every_zero_stage(tmp_path):
    """V8 of the spike benchmark: ``faults.corrupt_persistent`` scales the fp32 master too, so the
    corrupted weight outlives the step on ZeRO-1, 2 and 3 with the weight's master split over 2 ranks
    (each rank scales the fragment it owns; the test checks both own one), in bf16 and in fp32 (the benchmark's text runs: ZeRO-2
    keeps a separate fp32 master even then); a transient corruption is undone by the step."""
    import os
    import subprocess

    from helpers import BIN, free_port

    from transformers import AutoModelForCausalLM, LlamaConfig

    from bigtrain.data import build_tokenizer

    # Tied embeddings and a narrow model: the output projection (= the input embedding, the first
    # parameter) is most of the flat buffer, so ZeRO-1/2 split its master between the 2 ranks.
    tok = build_tokenizer(None)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = tmp_path / "m"
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(model)
    tok.save_pretrained(model)
    script = tmp_path / "persist.py"
    script.write_text(PERSIST_SCRIPT)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                          str(script), str(model)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    ratios = eval([line for line in out.stdout.splitlines() if line.startswith("{")][0])
    assert len(ratios) == 8, ratios
    for (stage, precision, persistent), (low, high, shares, numel) in ratios.items():
        assert [low, high] == ([4.0, 4.0] if persistent else [1.0, 1.0]), (stage, precision, ratios)
        if stage < 3:  # both ranks own a part of the weight's master, together all of it
            assert min(shares) > 0 and sum(shares) == numel, (stage, precision, shares, numel)


def test_the_injector_corrupts_persistently_only_when_asked_and_only_on_every_rank(monkeypatch):
    """``faults.corrupt_persistent`` reaches corrupt_weights through the loop's hook, once; a subset of
    ranks is refused (ZeRO partitions the master: the ranks would scale whatever slices they own)."""
    import bigtrain.faults as faults

    calls = []
    monkeypatch.setattr(faults, "corrupt_weights", lambda engine, scale, persistent: calls.append((scale, persistent)))
    for persistent in (False, True):
        inj = FaultInjector(FaultConfig(corrupt_weights_step=3, corrupt_scale=2.0, corrupt_persistent=persistent), 0)
        for step in range(5):
            inj.begin_step(Progress(step=step), Sampler(12, seed=0), [], 8, 4, engine=None)
    assert calls == [(2.0, False), (2.0, True)]
    with pytest.raises(ValueError, match="faults.ranks empty"):
        FaultConfig(corrupt_weights_step=3, corrupt_persistent=True, ranks=[1])
