"""One slot's batches in one epoch (train): blocks read, permuted, decoded, bad entries replaced.

The design (shuffle blocks, seeded crops, stand-ins for bad samples) is in :mod:`pipeline.data.loader`.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.data.errors import DataError
from pipeline.data.gpu_decode import JpegBatch, JpegPacker
from pipeline.data.pixels import decode_or_skip
from pipeline.data.plan import EpochPlan, emission_order, rng
from pipeline.data.samples import SKIPPED, Tally, read_positions, stand_in
from pipeline.data.tario import RawSample, ReaderCache
from pipeline.data.transforms import CropDraws, Deferred, batch_tensor, render_or_defer
from pipeline.metric_names import DATA_SAMPLES_READ

if TYPE_CHECKING:
    from pipeline.data.train_stream import TrainStream

_TAG_AUG = 0xA06


class SlotEpoch:
    """The batches of one slot in one epoch: blocks read, permuted, decoded, bad entries replaced."""

    def __init__(self, stream: TrainStream, plan: EpochPlan, slot: int, readers: ReaderCache, tally: Tally) -> None:
        self.s, self.plan, self.slot, self.readers, self.tally = stream, plan, slot, readers, tally
        self.piece = plan.pieces[slot]
        self.key = dict(seed=stream.seed, epoch=plan.epoch, generation=plan.generation, slot=slot)
        self.blocks: dict[int, list[RawSample]] = {}

    def _block(self, q: int) -> list[RawSample]:
        if q not in self.blocks:
            positions = emission_order(self.piece, q, shuffle_buffer=self.s.shuffle_buffer, key=self.key)
            self.blocks[q] = read_positions(self.plan.locate, positions, self.s.source, self.readers)
        return self.blocks[q]

    def batches(self, start: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, list[str], JpegBatch | None]]:
        B, K = self.s.batch_size, self.s.shuffle_buffer
        for j in range(start, self.plan.batches_per_slot):
            e0, e1 = j * B, (j + 1) * B
            entries: list[RawSample] = []
            for q in range(e0 // K, (e1 - 1) // K + 1):
                lo, hi = max(e0, q * K) - q * K, min(e1, (q + 1) * K) - q * K
                entries.extend(self._block(q)[lo:hi])
            for q in [q for q in self.blocks if q < (e1 - 1) // K]:
                del self.blocks[q]  # the buffer holds at most the blocks of the current batch
            yield (j, *self._assemble(entries, j))

    def _assemble(
        self, entries: list[RawSample], j: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[str], JpegBatch | None]:
        """Batch j's pixels (B, H, W, 3), labels and keys, and its JPEGs left to the device (nvjpeg)."""
        look, B = self.s.look, len(entries)
        draws = CropDraws.draw(
            rng(*self.key.values(), j, _TAG_AUG), B, scale=look.crop_scale, ratio=look.crop_ratio, hflip=look.hflip
        )
        batch = batch_tensor((B, *look.image_size, 3), torch.uint8)  # (B, H, W, 3), shared memory in a worker
        u8 = batch.numpy()
        labels = torch.full((B,), SKIPPED, dtype=torch.int64)
        keys = [s.key for s in entries]
        jpegs = JpegPacker(nvjpeg=look.decoder == "nvjpeg")
        self.tally.counts[DATA_SAMPLES_READ] += B
        for i, sample in enumerate(entries):
            pixels, kind = self._decode(sample, i, draws)
            if kind is None:
                jpegs.put(u8, i, sample.image, pixels, self.tally.counts)  # type: ignore[arg-type]
                labels[i] = sample.label
            else:
                self.tally.skip(kind, sample.shard)
        good = (labels != SKIPPED).nonzero().flatten().tolist()
        if not good:
            good = self._rescue(u8, labels, keys, jpegs, draws, j)
        for i in range(B):
            if labels[i] == SKIPPED:  # a stand-in takes its place
                src = stand_in(i, good)
                u8[i], labels[i], keys[i] = u8[src], labels[src], keys[src]
                jpegs.copy(i, src)
        return batch, labels, keys, jpegs.pack()

    def _decode(self, sample: RawSample, i: int, draws: CropDraws) -> tuple[np.ndarray | Deferred | None, str | None]:
        """``sample`` rendered as entry i of the batch (its crop and flip draws), or why it is skipped."""
        look = self.s.look

        def render(data: bytes) -> np.ndarray | Deferred:
            box = functools.partial(draws.box, i, ratio=look.crop_ratio)
            flip = bool(draws.flip[i])
            return render_or_defer(data, box, look.image_size, flip, look.decoder, reduced=look.reduced_decode)

        return decode_or_skip(sample, render)

    def _rescue(
        self, u8: np.ndarray, labels: torch.Tensor, keys: list[str], jpegs: JpegPacker, draws: CropDraws, j: int
    ) -> list[int]:
        """No entry of batch j was readable: borrow readable samples from the slot's next blocks."""
        B, K = self.s.batch_size, self.s.shuffle_buffer
        nblocks = -(-len(self.piece) // K)
        first = ((j + 1) * B - 1) // K + 1
        filled: list[int] = []
        for step in range(nblocks):
            q = (first + step) % nblocks
            block = self._block(q)
            for sample in block:
                pixels, kind = self._decode(sample, len(filled), draws)
                if kind is None:  # a bad one is counted when its own batch comes
                    uncounted: defaultdict[str, int] = defaultdict(int)  # its fallback, too, when its batch comes
                    jpegs.put(u8, len(filled), sample.image, pixels, uncounted)  # type: ignore[arg-type]
                    labels[len(filled)], keys[len(filled)] = sample.label, sample.key
                    filled.append(len(filled))
                    if len(filled) == B:
                        break
            if q not in range(j * B // K, first):
                del self.blocks[q]
            if filled:
                return filled
        raise DataError(
            f"data: worker slot {self.slot} of epoch {self.plan.epoch} has no readable sample in its "
            f"{len(self.piece)} samples (shards {', '.join(sorted(self.tally.bad_shards)[:5])}); "
            f"check the data with `python -m pipeline.data check {self.s.source.index} --decode`"
        )
