"""The train stream of one rank (worker side) and its loader (main-process side), with the resume state.

The design (slots, order, resume at the same or another geometry) is in :mod:`pipeline.data.loader`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config.schema import DataConfig
from pipeline.data.errors import DataError
from pipeline.data.gpu_decode import JpegBatch, decode_device, decode_on_device
from pipeline.data.plan import EpochPlan, PastSplit, consumed_by_worker, plan_epoch
from pipeline.data.samples import COUNTER_NAMES, SKIPPED, Batch, Look, Source, Tally, stand_in
from pipeline.data.slots import SlotEpoch
from pipeline.data.transforms import Normalize
from pipeline.data.workers import data_loader, shutdown_event
from pipeline.metric_names import DATA_SAMPLES_READ, DATA_SKIPPED_PREFIX

log = logging.getLogger(__name__)

STATE_FORMAT = 1


@dataclass(frozen=True)
class Position:
    """Where a rank's stream stands: epoch, batches handed out in it, and its interrupted splits."""

    epoch: int = 0
    consumed: int = 0
    history: tuple[PastSplit, ...] = ()


@dataclass
class TrainStream(IterableDataset):
    """The infinite batch stream of one rank; each DataLoader worker plays one slot."""

    source: Source
    look: Look
    rank: int
    world_size: int
    num_workers: int
    batch_size: int
    seed: int
    shuffle_buffer: int
    start: Position = Position()

    @property
    def workers(self) -> int:
        return max(self.num_workers, 1)

    def plan(self, epoch: int, history: tuple[PastSplit, ...] = ()) -> EpochPlan:
        return plan_epoch(
            self.source.counts,
            seed=self.seed,
            epoch=epoch,
            slots=self.world_size * self.workers,
            batch_size=self.batch_size,
            history=history,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str], JpegBatch | None, dict[str, Any]]]:
        info = get_worker_info()
        # Rotate so the DataLoader's first poll (worker 0) lands on the slot that owns the next batch.
        w = ((info.id if info else 0) + self.start.consumed) % self.workers
        slot = self.rank * self.workers + w
        readers, tally = self.source.readers(), Tally()
        epoch, history, consumed = self.start.epoch, self.start.history, self.start.consumed
        try:
            while True:
                plan = self.plan(epoch, history)
                total = plan.batches_per_slot * self.workers
                assert total > 0 or history, "build_loader's geometry check guarantees batches in a fresh epoch"
                done = consumed_by_worker(consumed, w, self.workers)
                for j, u8, labels, keys, jpegs in SlotEpoch(self, plan, slot, readers, tally).batches(done):
                    meta = {"epoch": epoch, "batch": j * self.workers + w, "batches": total, "worker": w}
                    yield u8, labels, keys, jpegs, {**meta, **tally.snapshot()}
                epoch, history, consumed = epoch + 1, (), 0
        finally:
            readers.close()


class TrainLoader:
    """Infinite iterator of (images, labels) for one rank; see the module docstring for the design."""

    def __init__(
        self,
        stream: TrainStream,
        *,
        cfg: DataConfig,
        fingerprint: str,
        pin_memory: bool = False,
        with_keys: bool = False,
        decode_on: str | None = None,
        normalise_on: str | None = None,
    ) -> None:
        """``decode_on``: where ``data.decoder=nvjpeg`` decodes (see gpu_decode.decode_device);
        ``normalise_on``: where the CPU decoders' batches become float (see :class:`Normalize`)."""
        self._stream, self._cfg, self._fingerprint = stream, cfg, fingerprint
        self._norm = Normalize(cfg.mean, cfg.std, pin=pin_memory, device=normalise_on)
        self._with_keys = with_keys
        # nvjpeg without CUDA is refused here, as the rank builds its loader: before any step
        self._device = decode_device(decode_on) if cfg.decoder == "nvjpeg" else None
        self._pos = Position()
        self._base = dict.fromkeys(COUNTER_NAMES, 0)  # counts restored from a checkpoint
        self._live: dict[int, dict[str, Any]] = {}  # latest tally of each worker slot
        self._dl: DataLoader | None = None
        self._it: Iterator | None = None
        self.batches_per_epoch = stream.plan(0).batches_per_slot * stream.workers

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._pos.epoch

    @property
    def batches_in_epoch(self) -> int:
        """Batches of the current epoch handed out (including those before a resume)."""
        return self._pos.consumed

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch | tuple[torch.Tensor, torch.Tensor, list[str]]:
        if self._it is None:
            self._start()
        u8, labels, keys, jpegs, meta = next(self._it)  # type: ignore[arg-type]
        self._advance(meta)
        if self._device is None:
            images = self._norm(u8)  # (B, 3, H, W) float32
        else:
            images = self._decode(u8, labels, keys, jpegs)  # (B, 3, H, W) float32 on the device
        self._check_skips()
        labels = labels.pin_memory() if self._norm.pin else labels
        return (images, labels, keys) if self._with_keys else (images, labels)

    def _decode(self, u8: torch.Tensor, labels: torch.Tensor, keys: list[str], jpegs: JpegBatch | None) -> torch.Tensor:
        """nvjpeg: the batch decoded on the device; rows neither decoder reads get today's stand-ins."""
        look = self._stream.look
        got = decode_on_device(
            u8, jpegs, size=look.image_size, norm=self._norm, reduced=look.reduced_decode, device=self._device
        )  # fmt: skip
        got.count(self._base)
        if not got.failed:
            return got.images
        labels[got.failed] = SKIPPED
        good = (labels != SKIPPED).nonzero().flatten().tolist()
        if not good:
            raise DataError(
                f"data: no sample of a batch of rank {self._stream.rank} decodes ({', '.join(keys[:5])}, ...); "
                f"check the data with `python -m pipeline.data check {self._cfg.path} --decode`"
            )
        for i in got.failed:
            src = stand_in(i, good)
            got.images[i], labels[i], keys[i] = got.images[src], labels[src], keys[src]
        return got.images

    def _start(self) -> None:
        stream = replace(self._stream, start=self._pos)
        workers = self._cfg.num_workers
        self._dl = data_loader(stream, workers, self._cfg.prefetch_factor)
        self._it = iter(self._dl)
        self._base, self._live = self.counters(), {}

    def _advance(self, meta: dict[str, Any]) -> None:
        pos = self._pos
        expected = pos.consumed if meta["epoch"] == pos.epoch else 0
        assert meta["epoch"] in (pos.epoch, pos.epoch + 1) and meta["batch"] == expected, (
            f"data stream out of order: got epoch {meta['epoch']} batch {meta['batch']}, expected "
            f"epoch {pos.epoch} batch {pos.consumed}"
        )
        history = pos.history if meta["epoch"] == pos.epoch else ()
        if meta["batch"] + 1 == meta["batches"]:
            self._pos = Position(meta["epoch"] + 1, 0, ())
        else:
            self._pos = Position(meta["epoch"], meta["batch"] + 1, history)
        self._live[meta["worker"]] = meta

    def counters(self) -> dict[str, int]:
        """This rank's cumulative sample counts (read, and skipped by kind), for the tracker."""
        out = dict(self._base)
        for meta in self._live.values():
            for k, v in meta["counts"].items():
                out[k] += v
        return out

    def _check_skips(self) -> None:
        c = self.counters()
        read = c[DATA_SAMPLES_READ]
        skips = {k: v for k, v in c.items() if k.startswith(DATA_SKIPPED_PREFIX)}  # not read, not fallbacks
        skipped = sum(skips.values())
        cfg = self._cfg
        if read < cfg.skip_check_after or skipped <= cfg.max_skip_frac * read:
            return
        kinds = ", ".join(f"{k.removeprefix(DATA_SKIPPED_PREFIX)}={v}" for k, v in skips.items() if v)
        shards: Counter[str] = Counter()
        for meta in self._live.values():
            shards.update(meta["bad_shards"])
        worst = ", ".join(f"{name} ({n})" for name, n in shards.most_common(5))
        raise DataError(
            f"data: {skipped} of {read} samples read on rank {self._stream.rank} were skipped "
            f"({skipped / read:.2%}), above data.max_skip_frac={cfg.max_skip_frac} (judged after "
            f"data.skip_check_after={cfg.skip_check_after} samples): {kinds}; worst shards: {worst or 'n/a'}. "
            f"Find the damage with `python -m pipeline.data check {cfg.path} --decode`, re-write those "
            f"shards, or raise data.max_skip_frac"
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position after the last batch handed out (plus this rank's counters)."""
        s = self._stream
        return {
            "format": STATE_FORMAT,
            "kind": "train",
            "epoch": self._pos.epoch,
            "consumed": self._pos.consumed,
            "history": [asdict(p) for p in self._pos.history],
            "world_size": s.world_size,
            "num_workers": s.num_workers,
            "batch_size": s.batch_size,
            "shuffle_buffer": s.shuffle_buffer,
            "seed": s.seed,
            "fingerprint": self._fingerprint,
            "rank": s.rank,
            "counters": self.counters(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue from ``sd``: exactly when the geometry matches, else by re-splitting the epoch's rest."""
        s = self._stream
        _check_state(sd, self._fingerprint, s.seed)
        history = tuple(PastSplit(**p) for p in sd["history"])
        old = PastSplit(sd["world_size"], sd["num_workers"], sd["batch_size"], sd["shuffle_buffer"], sd["consumed"])
        old_stream = replace(s, world_size=old.world_size, num_workers=old.num_workers, batch_size=old.batch_size)
        total = old_stream.plan(sd["epoch"], history).batches_per_slot * old.workers
        if not 0 <= old.consumed < max(total, 1):
            raise DataError(f"data: loader state says {old.consumed} batches consumed of an epoch of {total}")
        here = PastSplit(s.world_size, s.num_workers, s.batch_size, s.shuffle_buffer, 0)
        if _geometry(old) == _geometry(here) or (old.consumed == 0 and not history):
            self._pos = Position(sd["epoch"], sd["consumed"], history)  # exact
        else:
            log.info(
                "data: resuming epoch %d with another geometry (%s -> %s): re-splitting the samples not yet consumed",
                sd["epoch"], old, here,
            )  # fmt: skip
            self._pos = Position(sd["epoch"], 0, (*history, old))
        keep = sd["rank"] == s.rank and sd["world_size"] == s.world_size
        self._base = {k: int(sd["counters"].get(k, 0)) if keep else 0 for k in COUNTER_NAMES}
        self._live = {}
        self._shutdown()

    def _shutdown(self) -> None:
        it, self._it, self._dl = self._it, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            shutdown_event().set()  # torch may SIGTERM a worker that does not stop in time
            it._shutdown_workers()
            shutdown_event().clear()

    def close(self) -> None:
        """Stop the worker processes (also done when the loader is garbage collected)."""
        self._base, self._live = self.counters(), {}
        self._shutdown()

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _geometry(p: PastSplit) -> tuple[int, int, int, int]:
    """What fixes a rank's stream besides seed and epoch (0 and 1 workers both mean one slot per rank)."""
    return p.world_size, p.workers, p.batch_size, p.shuffle_buffer


def _check_state(sd: dict[str, Any], fingerprint: str, seed: int) -> None:
    need = (
        "format",
        "kind",
        "epoch",
        "consumed",
        "history",
        "world_size",
        "num_workers",
        "batch_size",
        "shuffle_buffer",
        "seed",
        "fingerprint",
        "rank",
        "counters",
    )
    missing = [k for k in need if k not in sd]
    if missing or sd.get("kind") != "train" or sd.get("format") != STATE_FORMAT:
        raise DataError(
            f"data: not a train-loader state (missing {missing or 'nothing'}, kind={sd.get('kind')!r}, "
            f"format={sd.get('format')!r}); pass the dict saved from TrainLoader.state_dict()"
        )
    if sd["fingerprint"] != fingerprint:
        raise DataError(
            f"data: the loader state was saved for another shard layout (fingerprint {sd['fingerprint']} != "
            f"{fingerprint}): its positions would name other samples. Resume with the same data.path and shards, "
            f"or start a new run"
        )
    if sd["seed"] != seed:
        raise DataError(
            f"data: the loader state was saved with seed {sd['seed']} but this run uses seed {seed}; resume with "
            f"train.seed={sd['seed']} (the epoch's order depends on it)"
        )
