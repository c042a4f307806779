"""Deterministic fault injection (config section ``faults``), for tests and the spike benchmark.

Transient faults (NaN loss, scaled gradients, corrupted weights) fire once, the first time their
step is reached, and are remembered in the run's History so a rollback does not replay them. Bad data is
data: a run of consecutive ``poison_steps`` poisons samples those steps draw (``poison_fraction`` of
each rank's share, on the ranks in ``faults.ranks``), recorded as sample-id ranges, and with
``poison_documents`` every other block of their source documents too; those blocks stay garbage
whenever and in whichever epoch they are drawn - unless recovery skips them, as it should. The
documents all of whose blocks are garbage are recorded as the ground truth a benchmark scores the
quarantine against (without ``poison_documents``, only documents lying wholly in chosen blocks). Every
rank records the same poison, so decisions stay collective.
"""

from __future__ import annotations

import os

import torch

from bigtrain.checkpoint import Progress
from bigtrain.config import FaultConfig
from bigtrain.sampler import Sampler, SkipSet, blocks_of_documents


def poison_rows(x: torch.Tensor, ids: list[int], poisoned: list[list[int]], vocab: int,
                kind: str = "uniform") -> torch.Tensor:
    """Rows of ``x`` (samples ``ids``) that lie in a poisoned sample-id range become garbage, fixed per
    sample id (the same garbage in every epoch): ``kind`` as ``FaultConfig.poison_kind``. In place;
    returns ``x``."""
    for row, sid in enumerate(ids):
        if any(a <= sid < b for a, b in poisoned):
            g = torch.Generator().manual_seed(sid)
            if kind == "shuffled":
                x[row] = x[row][torch.randperm(x.shape[1], generator=g)]
            elif kind == "repeated":
                phrase = torch.randint(0, vocab, (8,), generator=g)
                x[row] = phrase.repeat(-(-x.shape[1] // 8))[:x.shape[1]]
            else:
                x[row] = torch.randint(0, vocab, (x.shape[1],), generator=g)
    return x


class FaultInjector:
    """The loop's one fault hook. It keeps its own state (what fired, what is poisoned), saved in
    ``History.faults`` so it survives rollbacks and resumes; the loop calls it at four points:
    ``begin_step`` (arm this step's faults), ``corrupt`` (garble poisoned rows of a micro-batch),
    ``scale_loss`` (NaN / gradient scaling) and ``after_rollback``. With no fault configured each is a
    no-op."""

    def __init__(self, cfg: FaultConfig, rank: int, train_docs: torch.Tensor | None = None, vocab: int = 0):
        self.cfg = cfg
        self.train_docs = train_docs
        self.vocab = vocab
        self.here = not cfg.ranks or rank in cfg.ranks
        self._loss_factor: float | None = None
        self.fired: list[str] = []
        self.poisoned: list[list[int]] = []
        """Half-open sample-id ranges whose blocks are garbage (bad data stays bad)."""
        self.poisoned_docs: list[int] = []
        """The documents made garbage (ground truth for the quarantine's precision)."""
        self.armed: list[list[int]] = []
        """[step, start, end]: the ranges each poison stretch added, by the step that armed it."""
        self._static()

    def _static(self) -> None:
        """``faults.poison_ids``: garbage from step 0 on, whatever the state loaded says; the documents
        all of whose blocks it covers join the ground truth."""
        if not self.cfg.poison_ids:
            return
        ranges = [tuple(r) for r in self.cfg.poison_ids]
        self.poisoned = [list(r) for r in Sampler.merge_ranges([*map(tuple, self.poisoned), *ranges])]
        self.armed += [[0, a, b] for a, b in ranges if [0, a, b] not in self.armed]
        blocks = {i for a, b in ranges for i in range(a, b)}
        self._whole_documents(blocks, blocks)

    def _sources(self, blocks) -> set[int]:
        """The documents these blocks draw tokens from."""
        docs: set[int] = set()
        for sid in blocks:
            first, last = (int(d) for d in self.train_docs[sid].tolist())
            docs.update(range(first, last + 1))
        return docs

    def _whole_documents(self, blocks, garbled: set[int]) -> None:
        """Add to the ground truth the documents of ``blocks`` every block of which is ``garbled``."""
        if self.train_docs is None:
            return
        docs = {d for d in self._sources(blocks) if set(blocks_of_documents(self.train_docs, [d])) <= garbled}
        self.poisoned_docs = sorted(set(self.poisoned_docs) | docs)

    def state_dict(self) -> dict:
        return {"fired": list(self.fired), "poisoned": [list(r) for r in self.poisoned],
                "poisoned_docs": list(self.poisoned_docs), "armed": [list(r) for r in self.armed]}

    def load_state_dict(self, d: dict) -> None:
        self.fired = list(d.get("fired", []))
        self.poisoned = [list(r) for r in d.get("poisoned", [])]
        self.poisoned_docs = list(d.get("poisoned_docs", []))
        # a state saved before ``armed`` existed: its poison counts as armed from the start (read garbled)
        self.armed = [list(r) for r in d.get("armed", [[0, a, b] for a, b in self.poisoned])]
        self._static()

    def _fire(self, kind: str, step: int, steps: list[int]) -> bool:
        key = f"{kind}@{step}"
        if step not in steps or key in self.fired:
            return False
        self.fired.append(key)
        return True

    def begin_step(self, progress: Progress, sampler: Sampler, skipped: list[list[int]], global_batch: int,
                   per_rank: int, engine, skips: SkipSet | None = None) -> None:
        """Arm the faults of step ``progress.step + 1`` (called before its batch is built)."""
        cfg = self.cfg
        self._loss_factor = None
        if not cfg.any:
            return
        step = progress.step + 1
        if self._fire("poison", step, cfg.poison_steps):
            self._poison_block(progress.cursor, sampler, skipped, step, global_batch, per_rank, skips)
        if self._fire("corrupt", step, [cfg.corrupt_weights_step]) and self.here:
            corrupt_weights(engine, cfg.corrupt_scale, cfg.corrupt_persistent)
        if self._fire("nan", step, cfg.nan_steps) and self.here:
            self._loss_factor = float("nan")
        if self._fire("scale_grad", step, cfg.scale_grad_steps) and self.here:
            self._loss_factor = cfg.grad_scale

    def _poison_block(self, cursor: int, sampler: Sampler, skipped: list[list[int]], step: int,
                      global_batch: int, per_rank: int, skips: SkipSet | None) -> None:
        """Poison samples of ``step`` and of the poison steps right after it (one bad stretch): in each
        step's batch, the first ``poison_fraction`` of each targeted rank's share (at least one)."""
        last = step
        while last + 1 in self.cfg.poison_steps:
            last += 1
            self.fired.append(f"poison@{last}")
        ahead, _ = sampler.take(cursor, global_batch * (last - step + 1), skipped, skips)
        ids = sampler.sample_ids(ahead)
        ranks = self.cfg.ranks or range(global_batch // per_rank)
        k = max(1, round(self.cfg.poison_fraction * per_rank))
        chosen = [sid for b in range(0, len(ids), global_batch) for r in ranks
                  for sid in ids[b + r * per_rank:b + r * per_rank + k]]
        bad = chosen
        if self.cfg.poison_documents and self.train_docs is not None:
            bad = blocks_of_documents(self.train_docs, self._sources(chosen))
        # Ground truth of bad *documents*: those every block of which is garbage. Without
        # poison_documents only the chosen blocks are garbled, so a document sharing a chosen block but
        # with other, clean blocks is not bad data.
        self._whole_documents(chosen, set(bad))
        added = Sampler.merge_ranges((i, i + 1) for i in bad)
        self.armed += [[step, a, b] for a, b in added]
        self.poisoned = [list(r) for r in Sampler.merge_ranges([*map(tuple, self.poisoned), *added])]

    def corrupt(self, batch: dict[str, torch.Tensor], ids: list[int], as_of: int | None = None) -> dict[str, torch.Tensor]:
        """Garble the rows of a micro-batch whose samples are poisoned; labels follow the tokens where
        they carry a loss. ``as_of``: the samples as a step read them (poison armed later left out:
        a block of a bad document read before the stretch that made it garbage was read clean).
        Returns ``batch``."""
        poisoned = self.poisoned if as_of is None else [[a, b] for s, a, b in self.armed if s <= as_of]
        if not poisoned:
            return batch
        x = poison_rows(batch["input_ids"], list(ids), poisoned, self.vocab, self.cfg.poison_kind)
        if batch["labels"] is batch["input_ids"]:
            batch["labels"] = x
        else:
            batch["labels"] = torch.where(batch["labels"] != -100, x, -100)
        batch["input_ids"] = x
        return batch

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self._loss_factor is None else loss * self._loss_factor

    def after_rollback(self, up_to_step: int) -> None:
        """After the rollback's load: transient faults scheduled up to ``up_to_step`` (the spike) belong
        to the discarded timeline and never fire (poison is data, not time: it is not expired); then
        ``crash_in_recovery`` kills this rank the way kill -9 would, mid-recovery."""
        cfg = self.cfg
        schedule = {"nan": cfg.nan_steps, "scale_grad": cfg.scale_grad_steps,
                    "corrupt": [cfg.corrupt_weights_step] if cfg.corrupt_weights_step else []}
        for kind, steps in schedule.items():
            for step in steps:
                key = f"{kind}@{step}"
                if step <= up_to_step and key not in self.fired:
                    self.fired.append(key)
        if cfg.crash_in_recovery and self.here:
            os._exit(17)  # like kill -9: no cleanup, no flush


@torch.no_grad()
def corrupt_weights(engine, scale: float = 1000.0, persistent: bool = False) -> None:
    """Silent data corruption on this rank: the output projection times ``scale``. Under ZeRO-1/2 the
    rank's working copy; under ZeRO-3 its partition (``ds_tensor``) and, for a small parameter that
    ZeRO-3 keeps whole on every rank (below stage3_param_persistence_threshold), the full copy too.

    Transient (``persistent`` False): the optimizer's fp32 master partition is copied back over the
    working weights when it steps, so the corruption lasts the current step. ``persistent``: this
    rank's share of the fp32 master is scaled as well (a fault of the model state, such as a bit
    flip in optimizer memory), so the corruption stays in the weights from then on; only a rollback
    to a state from before it removes it. Local on every stage (no collective): each rank scales the
    fragment it owns, as DeepSpeed's ``safe_set_full_fp32_param`` writes it
    (deepspeed/utils/tensor_fragment.py ``set_full_hp_param``; ZeRO-3:
    deepspeed/runtime/zero/stage3.py ``set_full_hp_param``). Scaling needs no full value, so no
    gather either. Without a ZeRO optimizer the working weight is the master: already persistent."""
    weight = engine.module.get_output_embeddings().weight
    if weight.data.numel() > 0:
        weight.data.mul_(scale)
    if getattr(weight, "ds_tensor", None) is not None and weight.ds_tensor.data_ptr() != weight.data.data_ptr():
        weight.ds_tensor.data.mul_(scale)
    if not persistent:
        return
    if hasattr(weight, "ds_id"):  # ZeRO-3: this rank's slice of the flat fp32 partition
        opt = weight._z3_optimizer
        part, group = opt._get_fp32_opt_state_partition(weight, release_swap_buffers=False)
        part.mul_(scale)
        if opt._swappable_optimizer_subgroup(group):  # NVMe offload: write the changed subgroup back
            opt._optimizer_states_and_gradient_swap_out(group)
    elif getattr(weight, "_hp_mapping", None) is not None:  # ZeRO-1/2 (and the bf16 optimizer)
        weight._hp_mapping.get_hp_fragment().mul_(scale)
