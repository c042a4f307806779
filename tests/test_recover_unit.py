"""Spike recovery (bigtrain/recovery.py), quick tier: recover() on one rank, in process, with a fake
engine: the rollback restores the progress and the weights, keeps the history, and treats each cause
as its rule says; the quarantine and the skip window it applies."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch

from bigtrain.checkpoint import CheckpointStore, TrainState
from bigtrain.config import load_config
from bigtrain.faults import FaultInjector
from bigtrain import recovery
from bigtrain.recovery import GiveUp, recover
from bigtrain.recovery import rescore as real_rescore  # before the fixture replaces it
from bigtrain.run import Layout, Run
from bigtrain.sampler import Sampler
from bigtrain.spike import DATA, OPTIMIZER, SKIP_UPDATE, Escalation, Verdict, build_monitor

GLOBAL_BATCH, BLOCKS, TOKENS = 8, 400, 4


class FakeEngine:
    """What recover() uses of a DeepSpeed engine: save/load (the weights are bytes in one file),
    train(), and the optimizer's param groups."""

    def __init__(self):
        self.weights = b"init"
        self.training = False
        self.optimizer = types.SimpleNamespace(param_groups=[{"lr": 1e-3, "eps": 1e-8, "betas": (0.9, 0.95),
                                                              "weight_decay": 0.0}])

    def save_checkpoint(self, root, tag, client_state, save_latest):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "weights").write_bytes(self.weights)

    def load_checkpoint(self, root, tag, load_lr_scheduler_states):
        self.weights = (Path(root) / tag / "weights").read_bytes()
        self.optimizer.param_groups[0]["eps"] = 1.0  # DeepSpeed's load restores the saved hyper-parameters
        return str(Path(root) / tag), {}

    def train(self):
        self.training = True


class Events:
    def __init__(self):
        self.events, self.quarantined = [], []

    def event(self, row):
        self.events.append(row)

    def quarantine(self, rows):
        self.quarantined += list(rows)


@pytest.fixture(autouse=True)
def healthy_weights_rescore(monkeypatch):
    """The restored weights score each suspect as ``TRUTH`` says (default: the healthy level, 2.0 per
    token over 3 tokens): the real forward is tested in test_rescore_* below."""
    TRUTH.clear()
    SCORED_WITH.clear()
    SCORED_IDS.clear()
    SCORED_AS_OF.clear()

    def rescore(run, ids, as_of=None):
        SCORED_WITH.append(run.engine.weights)  # which weights were in place when the suspects were scored
        SCORED_IDS.append(list(ids))
        SCORED_AS_OF.append(as_of)
        return [3 * TRUTH.get(i, 2.0) for i in ids]
    monkeypatch.setattr(recovery, "rescore", rescore)


TRUTH: dict[int, float] = {}
SCORED_WITH: list[bytes] = []
SCORED_IDS: list[list[int]] = []
SCORED_AS_OF: list[int | None] = []


def make_run(tmp_path: Path, *overrides: str) -> Run:
    cfg = load_config(None, ["spike.warmup=4", "checkpoint.snapshot_interval=2", "faults.nan_steps=[13, 30]",
                             *overrides])
    docs = torch.tensor([[b // 4, b // 4] for b in range(BLOCKS)])  # documents of 4 blocks
    data = types.SimpleNamespace(train=np.zeros((BLOCKS, TOKENS)), train_docs=docs,
                                 doc_names=[f"doc{d}" for d in range(BLOCKS // 4)], sources=lambda sid: [f"s{sid}"],
                                 label_counts=lambda rows: [3.0] * len(rows))
    state = TrainState()
    state.history.eps, state.history.beta2 = cfg.optim.eps, cfg.optim.beta2
    return Run(cfg, FakeEngine(), None, state, Layout(0, 1, GLOBAL_BATCH, 1), data, Sampler(BLOCKS, seed=0),
               build_monitor(cfg.spike, 100), Escalation(cfg.spike), FaultInjector(cfg.faults, 0), Events(),
               CheckpointStore(tmp_path / "snaps", 4, interval=2), CheckpointStore(tmp_path / "ckpt", 3))


def step(run: Run, losses: list[float]):
    """One step whose samples have these mean losses (3 labelled tokens each); snapshots on cadence."""
    p, h = run.state.progress, run.state.history
    stream, cursor = run.sampler.take(p.cursor, GLOBAL_BATCH, h.skipped, run.skips)
    ids = run.sampler.sample_ids(stream)
    run.state.advance(cursor, GLOBAL_BATCH * TOKENS, True)
    run.engine.weights = f"weights of step {p.step}".encode()
    verdict = run.monitor.observe(p.step, float(np.mean(losses)), 1.0)
    run.monitor.samples.observe(p.step, ids, [3 * x for x in losses], [3.0] * len(losses), verdict.kind == "ok")
    if verdict.kind == "ok":
        run.snaps.maybe_save(p.step, run.save, {})
    return verdict, ids, {"loss": float(np.mean(losses)), "grad_norm": 1.0}


def healthy(run: Run, steps: int) -> None:
    rng = np.random.default_rng(0)
    for _ in range(steps):
        verdict, _, _ = step(run, list(2.0 + 0.01 * rng.standard_normal(GLOBAL_BATCH)))
        assert verdict.kind == "ok"


def test_an_optimizer_spike_rolls_back_skips_a_window_and_lowers_eps(tmp_path):
    run = make_run(tmp_path)
    healthy(run, 12)
    cursor_at_12 = run.state.progress.cursor
    verdict, _, row = step(run, [40.0] * GLOBAL_BATCH)  # every sample rises together: no outlier
    assert verdict.recover
    assert recover(run, verdict, row) is None
    p, h = run.state.progress, run.state.history
    assert (p.step, p.cursor) == (12, cursor_at_12) and run.engine.weights == b"weights of step 12"
    assert run.engine.training
    (event,) = run.rec.events
    assert (event["cause"], event["restored_step"], event["action"]) == (OPTIMIZER, 12, "rollback+skip+eps")
    # The history survives the restore: the rollback is counted, the window skipped, eps lowered and set.
    assert h.rollbacks == 1 and h.wasted_steps == 1 and h.executed_steps == 13
    # The window: the rolled-back step's samples + 16 margin batches, counted among samples not banned
    # by id (outliers of the spiked step, if any, are banned and not counted twice).
    (start, end), = h.skipped
    window = set(run.sampler.sample_ids(range(start, end))) - set(h.skipped_samples)
    assert start == cursor_at_12 and len(window) == (1 + 16) * GLOBAL_BATCH
    assert h.eps == 1e-9 == run.engine.optimizer.param_groups[0]["eps"]
    assert h.lr_scale_step == 12 and run.snaps.saved[-1] == 12
    # The monitor's statistics are those saved at step 12 (the spike never entered them), and the
    # transient fault scheduled at step 13 belongs to the discarded timeline: it never fires.
    assert run.monitor.state_dict() == run.state.progress.monitor
    assert "nan@13" in run.faults.fired and "nan@30" not in run.faults.fired


def test_a_skip_update_verdict_restores_the_step_before_and_changes_nothing_else(tmp_path):
    run = make_run(tmp_path)
    healthy(run, 12)
    step(run, [2.0] * GLOBAL_BATCH)  # step 13: not a snapshot step
    before = run.monitor.state_dict()
    cursor_at_12 = run.snaps.saved[-1], None
    verdict = Verdict(SKIP_UPDATE, "grad norm beyond 6 sigma", onset_step=13)
    assert recover(run, verdict, {"loss": 2.0, "grad_norm": 9.0}) is None
    h, (event,) = run.state.history, run.rec.events
    assert event["event"] == "skip_update" and event["restored_step"] == 12 and cursor_at_12[0] == 12
    assert run.state.progress.step == 12 and h.rollbacks == 1 and h.eps == 1e-8 and h.lr_scale == 1.0
    assert run.escalation.rollbacks == 0  # no budget applies
    (start, end), = h.skipped
    assert end - start == GLOBAL_BATCH  # exactly the step's samples: no margin
    assert run.monitor.state_dict() == before  # the flagged value stays in the monitor's window


def test_outlier_samples_are_data_skipped_by_id_with_their_documents_and_no_hyperparameter_changes(tmp_path):
    run = make_run(tmp_path)
    healthy(run, 12)
    losses = [2.0] * GLOBAL_BATCH
    losses[3] = 200.0  # one garbage sample
    verdict, ids, row = step(run, losses)
    assert verdict.recover
    TRUTH[ids[3]] = 200.0  # garbage to the healthy weights too
    assert recover(run, verdict, row) is None
    h = run.state.history
    (event,) = run.rec.events
    assert event["cause"] == DATA and event["offending_samples"] == [ids[3]]
    assert ids[3] in h.skipped_samples and h.skipped == [] and h.eps == 1e-8
    doc = ids[3] // 4
    assert h.skipped_docs == [doc] and set(h.skipped_samples) == set(range(4 * doc, 4 * doc + 4))
    assert set(run.skips.ids.tolist()) == set(h.skipped_samples)
    # The skipped sample is never drawn again.
    taken, _ = run.sampler.take(0, BLOCKS * 2, h.skipped, run.skips)
    assert ids[3] not in run.sampler.sample_ids(taken)


@pytest.mark.parametrize("window", [True, False])
def test_a_second_data_rollback_in_the_region_also_skips_the_stream_ahead(tmp_path, window):
    """spike.data_repeat_window through recover(): the first data rollback skips by id only; the second
    in the region also skips the window from the restored cursor (1 rolled-back step + 16 margin
    batches), one pass, and says so; turned off, it skips by id only again."""
    run = make_run(tmp_path, f"spike.data_repeat_window={str(window).lower()}")
    healthy(run, 12)
    for k, bad in enumerate((3, 5)):
        losses = [2.0] * GLOBAL_BATCH
        losses[bad] = 200.0
        verdict, ids, row = step(run, losses)
        assert verdict.recover
        TRUTH[ids[bad]] = 200.0
        assert recover(run, verdict, row) is None
    h, (first, second) = run.state.history, run.rec.events
    assert first["cause"] == second["cause"] == DATA and "skipped_range" not in first
    assert ids[5] in h.skipped_samples and h.eps == 1e-8 and h.lr_scale == 1.0
    if not window:
        assert h.skipped == [] and "skipped_range" not in second
        return
    restored = run.state.progress.cursor
    (start, end), = h.skipped
    assert second["skipped_range"] == [start, end] and start == restored and "stream ahead" in second["escalation"]
    passed_over = set(run.sampler.sample_ids(range(start, end))) - set(h.skipped_samples)
    assert len(passed_over) == (1 + 16) * GLOBAL_BATCH
    assert {r["sample_id"] for r in run.rec.quarantined if r["why"] == "window"} == passed_over


def test_an_outlier_the_restored_weights_score_as_usual_was_transient_not_data(tmp_path):
    """One sample far out on the spiked step, normal under the restored weights (a fault of the moment,
    as Megatron-LM's rerun would find): nothing is convicted, the window and the ladder apply."""
    run = make_run(tmp_path)
    healthy(run, 12)
    losses = [2.0] * GLOBAL_BATCH
    losses[3] = 200.0
    verdict, ids, row = step(run, losses)
    assert recover(run, verdict, row) is None
    (event,) = run.rec.events
    assert event["cause"] == OPTIMIZER and event["offending_samples"] == []
    assert event["attribution"]["transient_outliers"] == 1 and run.state.history.skipped_docs == []
    assert SCORED_WITH == [b"weights of step 12"] * 2  # suspects and control: the restored weights, not the spiked step's


def test_a_whole_batch_of_garbage_is_data_when_the_restored_weights_score_the_control_as_usual(tmp_path):
    """Every sample of the spiked step is garbage, to the restored weights too. The samples those weights
    trained on last (the control: the batch before the restored cursor) score at the usual level, so
    the weights are sound and the whole batch is data: banned by id with its documents, the LR, eps
    and beta2 left alone, no window."""
    run = make_run(tmp_path)
    healthy(run, 12)
    cursor_at_12 = run.state.progress.cursor
    verdict, ids, row = step(run, [200.0] * GLOBAL_BATCH)
    assert verdict.recover
    TRUTH.update({i: 200.0 for i in ids})
    assert recover(run, verdict, row) is None
    h, (event,) = run.state.history, run.rec.events
    control = run.sampler.sample_ids(range(cursor_at_12 - GLOBAL_BATCH, cursor_at_12))
    assert SCORED_IDS == [ids, control]  # the suspects, then the step-12 batch
    assert SCORED_AS_OF == [None, 12]  # the control read as step 12 read it (poison armed later left out)
    assert event["cause"] == DATA and event["offending_samples"] == sorted(ids) and not event["rank_aligned"]
    assert event["attribution"]["control_ratio"] == pytest.approx(1.0, rel=0.02)
    assert set(ids) <= set(h.skipped_samples) and h.skipped == [] and h.skipped_docs
    assert (h.eps, h.lr_scale, h.beta2) == (1e-8, 1.0, run.cfg.optim.beta2)


def test_a_restored_state_that_scores_its_own_training_data_high_convicts_nothing_as_data(tmp_path):
    """The same whole batch, but the restored weights score everything high, the control too: the judge
    itself is damaged, so nothing is called data; the window and the ladder apply."""
    run = make_run(tmp_path)
    healthy(run, 12)
    verdict, ids, row = step(run, [200.0] * GLOBAL_BATCH)
    TRUTH.update({i: 200.0 for i in range(BLOCKS)})
    assert recover(run, verdict, row) is None
    h, (event,) = run.state.history, run.rec.events
    assert event["cause"] == OPTIMIZER and event["attribution"]["control_ratio"] > 50
    assert h.skipped and h.eps < 1e-8


def test_the_control_is_the_last_global_batch_not_skipped_before_the_restored_cursor(tmp_path):
    run = make_run(tmp_path)
    healthy(run, 12)
    cursor = run.state.progress.cursor
    last = run.sampler.sample_ids(range(cursor - 2 * GLOBAL_BATCH, cursor))
    assert recovery.control_ids(run) == last[GLOBAL_BATCH:]
    # three of the last batch's samples skipped by id since: the control reaches back for three more
    run.state.history.skipped_samples = sorted(last[-3:])
    run.skips = recovery.SkipSet(run.state.history.skipped_samples)
    assert recovery.control_ids(run) == last[GLOBAL_BATCH - 3:-3]
    run.state.progress.cursor = 0
    assert recovery.control_ids(run) == []  # nothing trained before: no control


def test_a_spent_budget_gives_up_on_the_restored_healthy_state(tmp_path):
    run = make_run(tmp_path, "spike.max_rollbacks=1")
    healthy(run, 12)
    verdict, _, row = step(run, [40.0] * GLOBAL_BATCH)
    assert recover(run, verdict, row) is None
    verdict, _, row = step(run, [40.0] * GLOBAL_BATCH)
    reason = recover(run, verdict, row)
    assert isinstance(reason, GiveUp) and reason.restored and "rollback budget" in reason.reason
    assert [e["event"] for e in run.rec.events] == ["rollback", "give_up"]
    assert run.state.progress.step == 12 and run.engine.weights == b"weights of step 12"
    assert run.state.history.rollbacks == 1  # the refused rollback is not counted
    assert run.engine.optimizer.param_groups[0]["eps"] == run.state.history.eps  # set back after the load


def test_quarantine_optimizer_window_is_one_pass_and_document_convictions_are_capped():
    from bigtrain.checkpoint import History
    from bigtrain.recovery import quarantine
    from bigtrain.sampler import Sampler
    from bigtrain.spike import DATA, OPTIMIZER, Attribution

    # 100 blocks, 10 documents of 10 blocks each
    data = types.SimpleNamespace(train_docs=torch.tensor([[b // 10, b // 10] for b in range(100)]),
                                 doc_names=[f"doc{d}" for d in range(10)])
    sampler = Sampler(100, seed=1)
    state = History()
    # Optimizer: the window (2 rolled-back steps + 1 margin batch of 8) is a stream range, skipped once;
    # no sample id is banned for later epochs (it held 24 ids before).
    q = quarantine(state, sampler, data, Attribution(OPTIMIZER, [], {}), ([], [], []), (0, 2, 8, 1, 1))
    assert state.skipped == [[0, 24]] and state.skipped_samples == [] and len(q.rows) == 24
    assert {r["why"] for r in q.rows} == {"window"}
    # Data: outliers in documents 2, 5 and 7; at most 15 blocks convicted per rollback -> one document
    ids = [25, 51, 77, 3]
    a = Attribution(DATA, [0, 1, 2], {})
    q = quarantine(state, sampler, data, a, (ids, [9.0] * 4, [1.0] * 4), (24, 1, 8, 1, 1),
                   max_document_blocks=10, max_convicted_blocks=15)
    assert state.skipped_docs == [2] and q.event["offending_documents"] == [2]
    assert state.skipped_samples == sorted({25, 51, 77} | set(range(20, 30)))
    assert state.skipped == [[0, 24]]  # a data rollback skips no window
    # A data rollback that repeats one in its region (RecoveryPlan.skip_stream): the outliers by id and
    # the window from the restored cursor (1 rolled-back step + 1 margin batch of 8 samples not
    # skipped yet), one pass.
    q = quarantine(state, sampler, data, Attribution(DATA, [0], {}), ([40], [9.0], [1.0]), (24, 1, 8, 1, 1),
                   skip_stream=True)
    assert 40 in state.skipped_samples and q.event["cause"] == DATA
    window = [r for r in q.rows if r["why"] == "window"]
    # 16 samples not skipped already (by id or by the earlier window), from the restored cursor
    assert q.event["skipped_range"] == [24, state.skipped[0][1]] and len(window) == 16


def test_rollback_skip_window_counts_drawn_samples_not_stream_span():
    from bigtrain.recovery import skip_window

    s = Sampler(1000, seed=0)
    # First rollback: restored at cursor 100, 3 steps of 8 samples rolled back, 2 margin batches.
    newly, end = skip_window(s, 100, [], rolled_back_steps=3, global_batch=8, multiplier=1, margin_batches=2)
    assert newly == list(range(100, 140)) and end == 140
    # A repeat from the same restore point, escalated x2: 3 steps drawn again (at 140..164), so
    # 2*3 + 2 = 8 batches of samples not skipped yet; the earlier skip is not multiplied.
    newly, end = skip_window(s, 100, [(100, 140)], rolled_back_steps=3, global_batch=8, multiplier=2,
                             margin_batches=2)
    assert newly == list(range(140, 204)) and end == 204


def test_rescore_positions_are_the_neighbours_samples_in_equal_shares():
    layout = Layout(0, 4, 2, 3)  # 4 ranks x 6 samples per step
    n = 3 * layout.global_batch  # three suspect steps
    shares = [recovery.rescore_positions(n, layout, r) for r in range(4)]
    assert sorted(i for s in shares for i in s) == list(range(n)) and {len(s) for s in shares} == {18}
    for r, share in enumerate(shares):
        assert {(i % layout.global_batch) // layout.per_rank for i in share} == {(r - 1) % 4}
    assert recovery.rescore_positions(5, Layout(0, 1, 5, 1), 0) == list(range(5))


def test_rescore_is_the_restored_models_own_loss_of_each_suspect(tmp_path):
    """The real forward on one rank: each suspect's summed token loss from the model, in the order of
    the ids, poisoned rows garbled as in training, and the model back in train mode."""
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from bigtrain.config import FaultConfig
    from bigtrain.engine import token_losses

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    model.train()
    tokens = torch.randint(0, 50, (20, 12), generator=torch.Generator().manual_seed(1))
    data = types.SimpleNamespace(batch=lambda rows: {"input_ids": tokens[list(rows)].clone(),
                                                     "labels": tokens[list(rows)].clone()})
    faults = FaultInjector(FaultConfig(), 0, vocab=50)
    faults.poisoned = [[7, 8]]  # sample 7 is garbage wherever it is read
    run = types.SimpleNamespace(layout=Layout(0, 1, 2, 2), engine=model, data=data, faults=faults)
    ids = [3, 7, 1, 9, 12, 0, 5, 7]  # two steps of a global batch of 4
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        got = real_rescore(run, ids)
    finally:
        dist.destroy_process_group()
    assert model.training  # back in train mode
    model.eval()
    with torch.no_grad():
        batch = faults.corrupt(data.batch(ids), ids)
        expected = token_losses(model(input_ids=batch["input_ids"]).logits, batch["labels"]).sum(1)
        clean = token_losses(model(input_ids=tokens[[7]]).logits, tokens[[7]]).sum(1).item()
    assert got == pytest.approx(expected.tolist(), rel=1e-5)
    assert got[1] == got[7] != pytest.approx(clean, rel=1e-4)  # sample 7 was scored garbled, both times


def test_noise_on_an_accepted_step_is_skipped_with_its_documents_without_a_rollback(tmp_path):
    """Issue 14: a sample no better than a uniform guess, too thin to spike its step, is skipped with
    its documents from the next step on, in every epoch; hard text is not; a rollback keeps the skips."""
    run = make_run(tmp_path)
    run.vocab = 256  # uniform guess: ln 256 = 5.55
    healthy(run, 12)
    level = run.monitor.samples.reference(run.cfg.spike.mad_floor)[0]  # ln 2, as the loop takes it
    ids = run.sampler.sample_ids(run.sampler.take(run.state.progress.cursor, GLOBAL_BATCH, [], run.skips)[0])
    losses = [2.0] * GLOBAL_BATCH
    # Hard text at 2.2x the level; noise; a line of slashes the model gets confidently wrong (as bad
    # as the noise by its loss, but one token repeated).
    losses[2], losses[5], losses[6] = 4.4, 6.0, 6.0
    tokens = {ids[5]: torch.randperm(256)[:64], ids[6]: torch.full((64,), 47)}
    counts = [63.0] * GLOBAL_BATCH  # labelled tokens: column 0 is never a target

    def batch(sids):
        x = torch.stack([tokens.get(sid, torch.arange(64) % 20) for sid in sids])
        return {"input_ids": x, "labels": x}
    run.data.batch = batch
    assert recovery.screen(run, ids, [63 * x for x in losses], counts, level)
    h, (event,) = run.state.history, run.rec.events
    doc = ids[5] // 4
    assert h.screens == 1 and h.rollbacks == 0 and h.skipped == [] and h.eps == 1e-8 and h.lr_scale == 1.0
    assert h.skipped_docs == [doc] and set(h.skipped_samples) == set(range(4 * doc, 4 * doc + 4))
    assert (event["event"], event["cause"], event["offending_samples"], event["screen"]) == \
        ("screen", "noise", [ids[5]], 1)
    rows = {q["sample_id"]: q for q in run.rec.quarantined}
    assert rows[ids[5]]["why"] == "noise" and rows[ids[5]]["loss"] == pytest.approx(6.0)
    assert h.screened_blocks == len(rows) == 4
    assert all(q["screen"] == 1 and q["step"] == 12 for q in rows.values())
    assert {q["why"] for sid, q in rows.items() if sid != ids[5]} == {"document"}
    taken, _ = run.sampler.take(0, BLOCKS * 2, h.skipped, run.skips)  # two epochs
    assert not set(run.sampler.sample_ids(taken)) & set(h.skipped_samples)
    # Nothing new to skip the second time: no event, no ordinal spent.
    assert not recovery.screen(run, ids, [63 * x for x in losses], counts, level)
    assert h.screens == 1 and len(run.rec.events) == 1
    # Too few labelled tokens for the mean to mean anything: not screened.
    assert not recovery.screen(run, ids, [5 * x for x in losses], [5.0] * GLOBAL_BATCH, level)
    # A rollback restores progress, not the history: the screened document is never drawn again.
    verdict, _, row = step(run, [40.0] * GLOBAL_BATCH)
    assert recover(run, verdict, row) is None
    taken, _ = run.sampler.take(run.state.progress.cursor, BLOCKS * 2, run.state.history.skipped, run.skips)
    assert not set(run.sampler.sample_ids(taken)) & set(range(4 * doc, 4 * doc + 4))


def test_the_noise_screen_turns_itself_off_past_its_budget(tmp_path):
    """spike.noise_max_total_blocks: past the budget the screen stops (and says so) instead of growing
    the checkpointed id set and re-sorting it at every step."""
    run = make_run(tmp_path, "spike.noise_max_total_blocks=4")
    run.vocab = 256
    healthy(run, 12)
    level = run.monitor.samples.reference(run.cfg.spike.mad_floor)[0]
    run.data.batch = lambda sids: {"input_ids": torch.stack([torch.randperm(256)[:64] for _ in sids]),
                                   "labels": torch.stack([torch.randperm(256)[:64] for _ in sids])}
    ids = run.sampler.sample_ids(run.sampler.take(run.state.progress.cursor, GLOBAL_BATCH, [], run.skips)[0])
    losses = [2.0] * GLOBAL_BATCH
    losses[0] = 6.0
    assert recovery.screen(run, ids, [63 * x for x in losses], [63.0] * GLOBAL_BATCH, level)
    assert [e["event"] for e in run.rec.events] == ["screen", "screen_off"]
    losses[0], losses[1] = 2.0, 6.0
    assert not recovery.screen(run, ids, [63 * x for x in losses], [63.0] * GLOBAL_BATCH, level)
    assert run.state.history.screens == 1


def test_train_skip_steps_passes_over_the_data_of_those_steps_once(tmp_path):
    """train.skip_steps (the PaLM / Megatron-LM manual recovery): at the range's first step the data of
    its steps is skipped once; the step count is unchanged; a rollback to before it does not redo it."""
    from bigtrain.config import ConfigError
    from bigtrain.preflight import check_skip_steps
    from bigtrain.train import skip_steps

    run = make_run(tmp_path, "train.skip_steps=[[5,7]]")
    healthy(run, 3)
    skip_steps(run)  # the next step is 4: not yet
    assert run.state.history.skipped == [] and run.rec.events == []
    healthy(run, 1)
    cursor = run.state.progress.cursor
    expected = run.sampler.sample_ids(run.sampler.take(cursor + 3 * GLOBAL_BATCH, GLOBAL_BATCH, [], run.skips)[0])
    skip_steps(run)
    h, (event,) = run.state.history, run.rec.events
    assert h.skipped == [[cursor, cursor + 3 * GLOBAL_BATCH]] and h.manual_skips == [[5, 7]]
    assert (event["event"], event["step"], event["skipped_samples"]) == ("skip_steps", 5, 3 * GLOBAL_BATCH)
    _, ids, _ = step(run, [2.0] * GLOBAL_BATCH)  # step 5 trains on what step 8 would have drawn
    assert run.state.progress.step == 5 and ids == expected
    skip_steps(run)
    run.state.progress.step = 4  # as after a rollback to step 4: applied once only
    skip_steps(run)
    assert len(run.rec.events) == 1 and h.skipped == [[cursor, cursor + 3 * GLOBAL_BATCH]]
    # A range the run has passed without applying it (a resume from a later checkpoint) is refused.
    late = load_config(None, ["train.skip_steps=[[2,3]]"])
    with pytest.raises(ConfigError, match=r"train.skip_steps=\[\[6,LAST\]\]"):
        check_skip_steps(late, TrainState(progress=type(run.state.progress)(step=5)))
    check_skip_steps(load_config(None, ["train.skip_steps=[[5,7]]"]), run.state)  # applied: fine
    with pytest.raises(ConfigError, match="first <= last"):
        load_config(None, ["train.skip_steps=[[7,5]]"])
    for ranges in ("[[5,7],[5,7]]", "[[5,7],[6,8]]"):  # each step once: a duplicate would skip less than asked
        with pytest.raises(ConfigError, match="overlap"):
            load_config(None, [f"train.skip_steps={ranges}"])
    with pytest.raises(ConfigError, match="never be reached"):
        load_config(None, ["train.steps=100", "train.skip_steps=[[101,120]]"])
