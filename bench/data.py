"""Loader throughput vs a bare decode + crop loop on the same JPEGs; shard indexing and index loading.

    python bench/data.py [--quick] [--only loader|decode|index] [--n 2048] [--src-size 256] [--size 224] [--batch 64]

Writes synthetic JPEG shards to a temp dir, then measures images/s (steady state, first batch
excluded) of:

* bare loop: the JPEG bytes held in memory, PIL decode + torchvision RandomResizedCrop + flip +
  to-tensor + normalise, batched, in this process, no WebDataset and no DataLoader;
* bare loop with the loader's own decode functions (PIL and torchvision decoders);
* ``build_loader`` with 0 workers (in process), 1 worker (the per-worker figure), and 2 workers.

Decode (``--only decode``): ImageNet-size images (500x375, smooth gradients + noise, so they compress
like photos: ~60 KB as JPEG quality 90) stored as JPEG, PNG and WebP; per core (one process, 1 torch
thread), in interleaved rounds, the median images/s of the bare PIL + torchvision loop (full decode +
RandomResizedCrop + flip + to-tensor + normalise), the loader's decode + crop with reduced decode
(libjpeg DCT scaling, the default) and without, and ``build_loader`` with 0 workers. Per core means
per CPU second of the process (``time.process_time``): steadier than wall time on a shared machine,
and 0 workers keeps all of the loader's work in the process. The two "uint8 out" rows repeat the bare
loop and the loader's decode + crop without the float conversion + normalisation of each batch (the same
work on both sides, done by the loader once per batch in the rank's main process, not by a worker), each
compared with the other. Goal (issue 19): reduced decode on JPEGs >= 2x the bare loop; PNG/WebP have no
reduced decode and are reported as they are.
The JPEG rates per core of the loader's decode + crop (PIL and torchvision decoders, at the first
size) go to bench/decode_rate.json (``--rate-out``), which the launcher's ``--dry-run`` reads to plan
the cores each GPU rank needs (launch/data_budget.py).

Index (``--only index``): webdataset ``ShardWriter`` shards (jpg 4 KB, cls, json), indexed by
``python -m pipeline.data index`` (tar headers and label members only) in one process and in one process per CPU,
against GNU ``tar -tf`` run on one shard after another (the listing a shell loop would make); the
page cache is warm for both. Then an index of 100,000 shards is loaded as a rank loads it
(``read_index`` + the layout fingerprint), in a fresh process. Goals: one process faster than
``tar -tf``; loading < 2 s.

Goal: loader with 1 worker / bare loop >= 0.8. Torch runs 1 thread in every process (DataLoader
workers use 1 by default). With workers, the worker decodes and crops and the main process converts
uint8 to normalised float32 (see pipeline/data/transforms.py), so 1 worker can beat a one-process
loop on a machine with 2+ free cores; 0 workers is all the work on one core.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from pipeline.config.schema import DataConfig
from pipeline.data import build_loader, write_synthetic
from pipeline.data.transforms import CropDraws, Normalize, crop_resize

UINT8 = "uint8 out (no normalisation), "  # rows compared with the bare loop's own uint8 row
RATE_FILE = Path(__file__).resolve().parent / "decode_rate.json"  # launch/data_budget.py reads it


def jpeg_bytes(root: Path) -> list[bytes]:
    out = []
    for tar in sorted(root.glob("train-*.tar")):
        with tarfile.open(tar) as tf:
            out += [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]
    return out


def rate(make_batches, images: int, clock=time.perf_counter) -> float:
    """images/s over all batches after the first (start-up excluded), by ``clock``."""
    it = make_batches()
    first = next(it)
    start, n = clock(), 0
    for batch in it:
        n += batch.shape[0]
        if n >= images:
            break
    del first
    return n / (clock() - start)


def bare_tv(data: list[bytes], size: int, batch: int, normalise: bool = True):
    """``normalise=False``: the uint8 batch, as a loader worker hands it over (no float conversion)."""
    tf = transforms.Compose(
        [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]
    )
    norm = Normalize(DataConfig().mean, DataConfig().std) if normalise else lambda u8: u8
    while True:
        for i in range(0, len(data) - batch + 1, batch):
            imgs = [tf(Image.open(io.BytesIO(b)).convert("RGB")) for b in data[i : i + batch]]  # (3, H, W) each
            yield norm(torch.stack(imgs).permute(0, 2, 3, 1))  # Normalize takes (B, H, W, 3)


def bare_own(data: list[bytes], size: int, batch: int, decoder: str, reduced: bool = True, normalise: bool = True):
    cfg = DataConfig()
    gen = np.random.default_rng(0)
    norm = Normalize(cfg.mean, cfg.std) if normalise else lambda u8: u8
    while True:
        for i in range(0, len(data) - batch + 1, batch):
            draws = CropDraws.draw(gen, batch, scale=cfg.crop_scale, ratio=cfg.crop_ratio, hflip=cfg.hflip)
            u8 = np.empty((batch, size, size, 3), dtype=np.uint8)
            for j, b in enumerate(data[i : i + batch]):
                box = partial(draws.box, j, ratio=cfg.crop_ratio)
                u8[j] = crop_resize(b, box, (size, size), bool(draws.flip[j]), decoder, reduced=reduced)
            yield norm(torch.from_numpy(u8))


def loader_batches(root: Path, size: int, batch: int, workers: int, decoder: str, split: str = "train"):
    cfg = DataConfig(path=str(root), num_workers=workers, decoder=decoder, shuffle_buffer=256, train_split=split)
    with build_loader(cfg, rank=0, world_size=1, batch_size=batch, image_size=(size, size), seed=0) as loader:
        for images, _ in loader:
            yield images


def photo(i: int, h: int, w: int) -> np.ndarray:
    """An (h, w, 3) uint8 image that compresses like a photo: three smooth colour waves plus sensor-like noise."""
    g = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)  # (h, w) in [0, 1)
    f = g.uniform(0.3, 2.0, (3, 2))  # periods across the image, per channel and axis
    waves = [128 + 90 * np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy) + g.uniform(0, 2 * np.pi)) for c in range(3)]
    img = np.stack(waves, -1) + g.normal(0, 10, (h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_photos(root: Path, n: int, fmt: str) -> list[bytes]:
    """``n`` 500x375 photo-like images as shards in ``root`` (split ``train``); their bytes, in key order."""
    from pipeline.data.sources import encode
    from pipeline.data.writer import Item, write_samples

    data = [encode(photo(i, 375, 500), fmt, 90) for i in range(n)]
    items = [Item(f"p{i:06d}", i % 10, lambda b=b: (b, fmt)) for i, b in enumerate(data)]
    classes = [str(c) for c in range(10)]
    write_samples(root, items, classes=classes, source={"kind": "bench"}, image_size=None, val_frac=0.0)
    return data


def make_foreign_shards(root: Path, shards: int, per_shard: int) -> list[Path]:
    """Shards as public WebDataset copies look: webdataset's ShardWriter, jpg + cls + json per sample."""
    import webdataset as wds

    gen = np.random.default_rng(0)
    payload = [gen.integers(0, 256, 4096, dtype=np.uint8).tobytes() for _ in range(16)]  # never decoded here
    with wds.ShardWriter(str(root / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(shards * per_shard):
            sink.write({"__key__": f"s{i:09d}", "jpg": payload[i % 16], "cls": i % 1000, "json": {"label": i % 1000}})
    return sorted(root.glob("train-*.tar"))


def _cpu() -> float:
    """CPU seconds of this process and its finished children (tar, the index's worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, repeat: int) -> tuple[float, float]:
    """(wall s, CPU s) of the fastest of ``repeat`` runs: on a shared machine CPU time is the steadier one."""
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        t, c = time.perf_counter(), _cpu()
        fn()
        best = min(best, (time.perf_counter() - t, _cpu() - c))
    return best


def index_bench(shards: int, per_shard: int, repeat: int, big: int) -> None:
    from pipeline.data.index import CLS_LABELS
    from pipeline.data.indexer import scan_all

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_foreign_shards(Path(tmp), shards, per_shard)
        members = shards * per_shard * 3
        names = [str(p) for p in paths]
        tar_tf = lambda: [subprocess.run(["tar", "-tf", n], check=True, capture_output=True) for n in names]  # noqa: E731
        methods = {"GNU tar -tf, one shard after another": tar_tf}
        for jobs in sorted({1, os.cpu_count() or 1}):
            scan = partial(scan_all, names, CLS_LABELS, jobs=jobs, sha256=False, progress=False)
            methods[f"pipeline.data index, {jobs} process{'es' if jobs > 1 else ''}"] = scan
        best = {name: (float("inf"), float("inf")) for name in methods}
        for _ in range(repeat):  # interleaved rounds: a slow spell of a shared machine hits every method
            for name, fn in methods.items():
                best[name] = min(best[name], timed(fn, 1))
        rows = list(best.items())
        size = sum(p.stat().st_size for p in paths) / 2**20
    what = f"{shards} shards x {per_shard} samples ({members} members, {size:.0f} MiB)"
    print(f"\nindexing {what}, best of {repeat} interleaved rounds")
    print("| method | wall s | CPU s | shards/s | members/s | speed / tar -tf (wall) |\n|---|---|---|---|---|---|")
    for name, (s, cpu) in rows:
        print(f"| {name} | {s:.3f} | {cpu:.3f} | {shards / s:.0f} | {members / s:.0f} | {rows[0][1][0] / s:.2f}x |")
    load_bench(big, repeat)


LOAD = """
import sys, time
from pipeline.data.index import read_index
t, c = time.perf_counter(), time.process_time()
index = read_index(sys.argv[1])
index.fingerprint("train")
print(time.perf_counter() - t, time.process_time() - c, index.splits["train"].samples)
"""


def load_bench(n: int, repeat: int) -> None:
    """A rank's load of an index of ``n`` shards: read + validate + fingerprint, in a fresh interpreter."""
    from pipeline.data.index import DataIndex, ShardInfo, SplitInfo, write_index

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "big.json"
        shards = tuple(
            ShardInfo(f"/datasets/laion/{i:08d}.tar", 1000, 400 << 20, None, (1000, 1000, 1000)) for i in range(n)
        )
        split = SplitInfo("train", shards, (n * 1000,), 0, ("cls", "jpg", "json"))
        write_index(DataIndex(root=Path(tmp), classes=("0",), splits={"train": split}, file=file))
        runs = []
        for _ in range(repeat):
            out = subprocess.run([sys.executable, "-c", LOAD, str(file)], check=True, capture_output=True, text=True)
            runs.append(tuple(map(float, out.stdout.split()[:2])))
        mib = file.stat().st_size / 2**20
    (wall, cpu), worst = min(runs), max(runs)
    print(f"\nindex of {n} shards ({mib:.1f} MiB JSON) loaded by a rank (read, validate, fingerprint): best "
          f"{wall:.2f} s wall / {cpu:.2f} s CPU, worst {worst[0]:.2f} s wall of {repeat} (goal < 2 s)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small run (a smoke test of the script)")
    p.add_argument("--only", choices=("loader", "decode", "index"), help="run one of the three benchmarks")
    p.add_argument("--decode-n", type=int, default=512, help="decode: images per format")
    p.add_argument("--decode-sizes", default="224,128", help="decode: output sides, comma-separated")
    p.add_argument("--rounds", type=int, default=5, help="decode: interleaved rounds (medians are compared)")
    p.add_argument("--index-shards", type=int, default=100, help="index: shards written")
    p.add_argument("--index-samples", type=int, default=500, help="index: samples per shard")
    p.add_argument("--index-load", type=int, default=100_000, help="index: shards in the index whose load is timed")
    p.add_argument("--n", type=int, default=2048, help="synthetic images written")
    p.add_argument("--src-size", type=int, default=256, help="side of the stored JPEGs")
    p.add_argument("--size", type=int, default=224, help="train crop side")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="best of N runs per row (a loaded machine is noisy)")
    p.add_argument("--rate-out", type=Path, default=RATE_FILE, help="decode: where the JPEG rates per core go")
    a = p.parse_args()
    if a.quick:
        a.n, a.src_size, a.size, a.batch, a.repeat = 256, 128, 112, 32, 1
        a.index_shards, a.index_samples, a.index_load = 8, 50, 1000
        a.decode_n, a.decode_sizes, a.rounds = 96, "224", 1
    if a.only in (None, "index"):
        index_bench(a.index_shards, a.index_samples, a.repeat, a.index_load)
    if a.only in (None, "loader"):
        loader_bench(a)
    if a.only in (None, "decode"):
        decode_bench(a.decode_n, [int(x) for x in a.decode_sizes.split(",")], a.batch, a.rounds, a.rate_out)


def decode_bench(n: int, sizes: list[int], batch: int, rounds: int, rate_out: Path | None = None) -> None:
    """Per-core images/s on 500x375 photos: the bare loop against the loader's decode, interleaved rounds."""
    torch.set_num_threads(1)
    batch = min(batch, n // 4)
    measure = n - 2 * batch  # images timed per round, after the first batch
    print(f"\nper core: images per CPU second of 1 process (1 torch thread), {n} images 500x375 per format, "
          f"{measure} timed per round after the 1st batch, batch {batch}, median of {rounds} interleaved rounds, "
          f"{os.cpu_count()} CPUs visible")  # fmt: skip
    print("| format | crop | measurement | images/CPU-s (median) | min-max | / bare loop |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("jpg", "png", "webp"):
            root = Path(tmp) / fmt
            data = write_photos(root, n, fmt)
            kb = sum(map(len, data)) / len(data) / 1024
            for size in sizes:
                methods = {
                    "bare loop: PIL + torchvision.transforms": partial(bare_tv, data, size, batch),
                    "loader's decode + crop, reduced decode": partial(bare_own, data, size, batch, "pil", True),
                    "loader's decode + crop, full decode": partial(bare_own, data, size, batch, "pil", False),
                    "loader's decode + crop, torchvision decoder": partial(bare_own, data, size, batch, "torchvision"),
                    "build_loader, 0 workers (reduced decode)": partial(loader_batches, root, size, batch, 0, "pil"),
                    # the worker's share alone: the same two loops without the per-batch float conversion, which
                    # costs both the same and which the loader does once per batch in the rank's main process
                    f"{UINT8}bare loop": partial(bare_tv, data, size, batch, normalise=False),
                    f"{UINT8}loader's decode + crop, reduced decode": partial(
                        bare_own, data, size, batch, "pil", True, normalise=False
                    ),
                }
                got: dict[str, list[float]] = {name: [] for name in methods}
                for _ in range(rounds):  # interleaved: a slow spell of a shared machine hits every method
                    for name, make in methods.items():
                        got[name].append(rate(make, measure, clock=time.process_time))
                base = {False: float(np.median(got[next(iter(got))])), True: float(np.median(got[f"{UINT8}bare loop"]))}
                for name, rates in got.items():
                    med = float(np.median(rates))
                    print(f"| {fmt} ({kb:.0f} KB) | {size} | {name} | {med:.0f} | {min(rates):.0f}-{max(rates):.0f} "
                          f"| {med / base[name.startswith(UINT8)]:.2f}x |")  # fmt: skip
                if fmt == "jpg" and size == sizes[0] and rate_out is not None:
                    pil = float(np.median(got["loader's decode + crop, reduced decode"]))
                    tv = float(np.median(got["loader's decode + crop, torchvision decoder"]))
                    write_rates(rate_out, {"pil": pil, "torchvision": tv}, kb=kb, size=size)


def write_rates(path: Path, per_core: dict[str, float], *, kb: float, size: int) -> None:
    """The JPEG decode + crop rates per core, for the launcher's CPU budget (launch/data_budget.py reads it)."""
    record = {
        "img_per_core_s": {k: round(v, 1) for k, v in per_core.items()},
        "image": f"500x375 JPEG ({kb:.0f} KB)", "crop": size, "host": platform.node(),
        "cpu": platform.processor() or platform.machine(), "measured": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"decode rates per core written to {path}: {record['img_per_core_s']}")


def loader_bench(a: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    measure = a.n - 2 * a.batch  # images timed per row
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bench"
        write_synthetic(root, n=a.n, classes=10, size=a.src_size, val_frac=0.0, shard_max_count=max(a.n // 8, 1))
        data = jpeg_bytes(root)
        rows = [("bare loop: PIL + torchvision.transforms", "pil", "-", partial(bare_tv, data, a.size, a.batch))]
        for dec in ("pil", "torchvision"):
            rows.append(
                (f"bare loop: loader's decode+crop ({dec})", dec, "-", partial(bare_own, data, a.size, a.batch, dec))
            )
        for dec in ("pil", "torchvision"):
            for workers in (0, 1, 2):
                rows.append(
                    (
                        f"build_loader ({dec})",
                        dec,
                        str(workers),
                        partial(loader_batches, root, a.size, a.batch, workers, dec),
                    )
                )
        rows = [(name, dec, w, max(rate(make, measure) for _ in range(a.repeat))) for name, dec, w, make in rows]
    base = rows[0][3]
    print(
        f"\nsettings: {a.n} JPEGs {a.src_size}x{a.src_size} -> crops {a.size}x{a.size}, batch {a.batch}, torch threads "
        f"1 per process, {os.cpu_count()} CPUs visible, {measure} images timed after the 1st batch, best of {a.repeat}"
    )
    print("| measurement | decoder | workers | images/s | / bare loop |\n|---|---|---|---|---|")
    for name, dec, workers, r in rows:
        print(f"| {name} | {dec} | {workers} | {r:.0f} | {r / base:.2f} |")
    for dec in ("pil", "torchvision"):
        one = next(r for _, d, w, r in rows if w == "1" and d == dec)
        same = next(r for n, d, w, r in rows if w == "-" and d == dec and "loader's" in n)
        print(
            f"ratio ({dec}): loader with 1 worker / bare torchvision.transforms loop = {one / base:.2f}; "
            f"/ bare loop with the same decode+crop = {one / same:.2f} (goal >= 0.8)"
        )


if __name__ == "__main__":
    main()
