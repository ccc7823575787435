"""Validation loading: every sample exactly once across ranks, the same batch count on every rank."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.config.schema import DataConfig
from pipeline.data.gpu_decode import JpegBatch, JpegPacker, decode_device, decode_on_device
from pipeline.data.pixels import decode_or_skip
from pipeline.data.samples import COUNTER_NAMES, SKIPPED, Batch, Look, Source, Tally, read_positions
from pipeline.data.tario import RawSample
from pipeline.data.transforms import Normalize, batch_tensor, eval_box, render_or_defer
from pipeline.data.workers import data_loader
from pipeline.metric_names import DATA_SAMPLES_READ


class ValStream(IterableDataset):
    """A rank's val batches; worker w makes batches w, w + W, ... (the DataLoader interleaves them)."""

    def __init__(
        self, source: Source, look: Look, *, rank: int, world_size: int, batch_size: int,
        subset: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        """``subset``: the split positions to read (sorted), when not the whole split."""
        super().__init__()
        self.source, self.look, self.rank, self.world_size, self.batch_size = source, look, rank, world_size, batch_size
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(source.counts, dtype=np.int64))])
        self.subset = subset
        self.total = int(self.starts[-1]) if subset is None else len(subset)
        # This rank's positions: a contiguous 1/world_size of the split (sizes differ by at most 1).
        self.bounds = rank * self.total // world_size, (rank + 1) * self.total // world_size

    def __len__(self) -> int:
        return max(1, math.ceil(math.ceil(self.total / self.world_size) / self.batch_size))

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = np.searchsorted(self.starts, positions, side="right") - 1
        return k, positions - self.starts[k]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str], JpegBatch | None, dict[str, Any]]]:
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        readers, tally = self.source.readers(), Tally()
        lo, hi = self.bounds
        try:
            for b in range(wid, len(self), workers):
                positions = np.arange(lo + b * self.batch_size, min(lo + (b + 1) * self.batch_size, hi))
                if self.subset is not None:
                    positions = self.subset[positions]
                samples = read_positions(self.locate, positions, self.source, readers)
                u8, labels, keys, jpegs = self._assemble(samples, tally)
                yield u8, labels, keys, jpegs, {"worker": wid, "batch": b, **tally.snapshot()}
        finally:
            readers.close()

    def _assemble(
        self, samples: list[RawSample], tally: Tally
    ) -> tuple[torch.Tensor, torch.Tensor, list[str], JpegBatch | None]:
        look, B = self.look, self.batch_size
        batch = batch_tensor((B, *look.image_size, 3), torch.uint8)  # (B, H, W, 3), shared memory in a worker
        u8 = batch.numpy()
        labels = torch.full((B,), SKIPPED, dtype=torch.int64)
        keys = [""] * B
        tally.counts[DATA_SAMPLES_READ] += len(samples)
        u8[len(samples) :] = 0  # padding
        box = functools.partial(eval_box, size=look.image_size, crop_pct=look.eval_crop_pct)
        render = functools.partial(
            render_or_defer, box_fn=box, size=look.image_size, flip=False, decoder=look.decoder,
            reduced=look.reduced_decode,
        )  # fmt: skip
        jpegs = JpegPacker(nvjpeg=look.decoder == "nvjpeg")
        for i, s in enumerate(samples):
            keys[i] = s.key
            pixels, kind = decode_or_skip(s, render)
            if kind is None:
                jpegs.put(u8, i, s.image, pixels, tally.counts)  # type: ignore[arg-type]
                labels[i] = s.label
            else:
                tally.skip(kind, s.shard)
                u8[i] = 0
        return batch, labels, keys, jpegs.pack()


class ValLoader:
    """Finite, re-iterable: each pass yields every val sample once across ranks, same batch count per rank."""

    def __init__(
        self, stream: ValStream, *, cfg: DataConfig, pin_memory: bool = False, with_keys: bool = False,
        decode_on: str | None = None, normalise_on: str | None = None,
    ) -> None:  # fmt: skip
        """``decode_on``: where ``data.decoder=nvjpeg`` decodes (see gpu_decode.decode_device);
        ``normalise_on``: where the CPU decoders' batches become float (see :class:`Normalize`)."""
        self._stream, self._cfg, self._with_keys = stream, cfg, with_keys
        self._norm = Normalize(cfg.mean, cfg.std, pin=pin_memory, device=normalise_on)
        self._device = decode_device(decode_on) if cfg.decoder == "nvjpeg" else None
        workers = min(cfg.num_workers, len(stream))
        self._dl = data_loader(stream, workers, cfg.prefetch_factor)
        self._counts = dict.fromkeys(COUNTER_NAMES, 0)

    def __len__(self) -> int:
        return len(self._stream)

    def __iter__(self) -> Iterator[Batch | tuple[torch.Tensor, torch.Tensor, list[str]]]:
        before, live, here = dict(self._counts), {}, dict.fromkeys(COUNTER_NAMES, 0)
        for u8, labels, keys, jpegs, meta in self._dl:
            live[meta["worker"]] = meta["counts"]
            images = self._norm(u8) if self._device is None else self._decode(u8, labels, jpegs, here)
            self._counts = {k: before[k] + here[k] + sum(c[k] for c in live.values()) for k in COUNTER_NAMES}
            labels = labels.pin_memory() if self._norm.pin else labels
            yield (images, labels, keys) if self._with_keys else (images, labels)

    def _decode(
        self, u8: torch.Tensor, labels: torch.Tensor, jpegs: JpegBatch | None, here: dict[str, int]
    ) -> torch.Tensor:
        """nvjpeg: the batch decoded on the device; a row neither decoder reads is skipped as the worker
        skips one (label SKIPPED, pixels zero), counted in ``here``."""
        look = self._stream.look
        got = decode_on_device(
            u8, jpegs, size=look.image_size, norm=self._norm, reduced=look.reduced_decode, device=self._device
        )  # fmt: skip
        labels[got.failed] = SKIPPED
        got.count(here)
        return got.images

    def counters(self) -> dict[str, int]:
        """Cumulative over all passes: samples read and skipped by kind (skipped ones have label SKIPPED)."""
        return dict(self._counts)

    def close(self) -> None:
        self._dl = None  # type: ignore[assignment]
