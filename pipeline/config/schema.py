"""Typed configuration: the single source of every default.

Each section is a small dataclass that validates itself in ``__post_init__``; ``Config`` adds
the checks that span sections (batch arithmetic, fine-tune head). The defaults describe the
embedded local job: a tiny ViT on generated shards, 2 CPU ranks, a local MLflow store. YAML
files hold only what differs (``configs/``), loaded strictly by :mod:`pipeline.config.loader`.
"""

from __future__ import annotations

import os
import posixpath
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pipeline.config.recipe import run_label
from pipeline.model.presets import pair

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and how to fix it."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class ModelConfig:
    """The ViT's constructor arguments (seed API) plus the per-block checkpointing switch.

    ``preset`` ("B/16", "S/14", ...) fills dim/depth/heads/mlp_dim/dim_head/patch_size when the
    file does not set them itself; the loader expands it, so the resolved config is explicit.
    """

    preset: str = ""
    image_size: int | tuple[int, int] = 32
    patch_size: int | tuple[int, int] = 4
    num_classes: int = 10
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 128
    pool: Literal["cls", "mean"] = "cls"
    channels: int = 3
    dim_head: int = 16
    dropout: float = 0.0
    emb_dropout: float = 0.0
    qkv_bias: bool = False
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-5
    # Layout options of other ViTs, for fine-tuning from their weights (see pipeline/model/vit.py).
    patch_norm: bool = False
    norm_before_pool: bool = False
    class_token: bool = True
    grad_checkpointing: bool = False  # the older switch: true is recompute=full
    # What backward recomputes instead of keeping (ViT.set_recompute; `--dry-run` plans each mode):
    # full redoes every block, selective only norms/GELU/dropout, every_k every recompute_every-th block.
    recompute: Literal["none", "full", "selective", "every_k"] = "none"
    recompute_every: int = 2

    def __post_init__(self) -> None:
        (ih, iw), (ph, pw) = pair(self.image_size), pair(self.patch_size)
        _require(
            ih % ph == 0 and iw % pw == 0,
            f"model.image_size {self.image_size} is not divisible by model.patch_size "
            f"{self.patch_size}; pick an image size that is a multiple of the patch size "
            f"(e.g. model.image_size={ih // ph * ph or ph})",
        )
        _require(
            self.class_token or self.pool == "mean",
            "model.pool='cls' needs model.class_token=true; set model.pool=mean for a model without a CLS token",
        )
        for key in ("num_classes", "dim", "depth", "heads", "mlp_dim", "channels", "dim_head"):
            _require(getattr(self, key) > 0, f"model.{key} must be > 0, got {getattr(self, key)}")
        for key in ("dropout", "emb_dropout", "drop_path_rate"):
            v = getattr(self, key)
            _require(0.0 <= v < 1.0, f"model.{key} must be in [0, 1), got {v}")
        self._check_recompute()

    def _check_recompute(self) -> None:
        modes = ("none", "full", "selective", "every_k")
        _require(self.recompute in modes, f"model.recompute={self.recompute!r}; use one of {', '.join(modes)}")
        _require(self.recompute_every >= 1, f"model.recompute_every must be >= 1, got {self.recompute_every}")
        if self.grad_checkpointing:
            _require(
                self.recompute in ("none", "full"),
                f"model.grad_checkpointing=true means model.recompute=full, but model.recompute={self.recompute!r}; "
                "set only model.recompute (and model.grad_checkpointing=false)",
            )

    @property
    def recompute_mode(self) -> str:
        """The recompute that runs: model.recompute, or "full" for the older model.grad_checkpointing=true."""
        return "full" if self.grad_checkpointing else self.recompute

    def vit_kwargs(self) -> dict:
        """Keyword arguments for ``pipeline.model.ViT``."""
        skip = {"preset", "grad_checkpointing", "recompute", "recompute_every"}
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in skip}


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://|^(pipe):")
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


def data_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be a data.path (a URL, a pipe, a brace pattern), or None; the message names the fix.

    Every rank opens the shards by seeking in them (exact resume reads samples by position), so the
    data must be files on a file system the nodes share, not a stream.
    """
    url = _URL.match(path)
    if url:
        scheme = url.group(1) or url.group(2)
        local = f"; for a local file drop the scheme (data.path={path[len('file://') :]})" if scheme == "file" else ""
        return (
            f"data.path {path!r}: the {scheme}: scheme is not supported; data.path must be a POSIX path on a file "
            f"system every node mounts (e.g. Lustre, GPFS, NFS): copy or mount the shards there, index them with "
            f"`python -m pipeline.data index SHARDS... --out INDEX.json` and set data.path=INDEX.json{local}"
        )
    if (_BRACES.search(path) or any(c in path for c in "*?[")) and not os.path.exists(path):
        return (
            f"data.path {path!r} is a shard pattern, not a data set: index the shards it names first with "
            f"`python -m pipeline.data index '{path}' --out INDEX.json` (it takes brace patterns and globs), "
            f"then set data.path=INDEX.json"
        )
    return None


@dataclass
class DataConfig:
    """Where the shards are and how samples become batches (see pipeline/data)."""

    # A shard directory holding _info.json (`python -m pipeline.data write`), or an index file
    # (`python -m pipeline.data index`) that names shards anywhere; a POSIX path the nodes share.
    path: str = "runs/data/synthetic"
    train_split: str = "train"
    val_split: str = "val"
    num_workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 512  # samples held per worker for the in-stream shuffle
    # pil/torchvision: decoded in the CPU workers (pil: colour JPEGs through simplejpeg's libjpeg-turbo, PIL's
    # pixels at ~3/4 of its time; other formats through PIL); nvjpeg: on the rank's GPU (pipeline/data/gpu_decode.py)
    decoder: Literal["pil", "torchvision", "nvjpeg"] = "pil"
    # JPEGs whose crop is >= 2x the output decoded at 1/2, 1/4 or 1/8 scale (libjpeg); same crop geometry
    reduced_decode: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: float = 0.5
    eval_crop_pct: float = 0.875  # resize to size / pct, then centre-crop (timm's convention)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_skip_frac: float = 0.01  # abort when more than this fraction of samples was unreadable
    skip_check_after: int = 1000  # samples read before the skip rate is judged
    val_batch_size: int = 0  # 0: same as train.micro_batch_size
    prefetch_factor: int = 2
    # batch transforms applied in the train step (off by default)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _require(self.path != "", "data.path is empty; set it to a shard directory or an index file")
        problem = data_path_problem(self.path)
        _require(problem is None, problem or "")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _require(self.shuffle_buffer >= 1, "data.shuffle_buffer must be >= 1 (1 = no shuffle)")
        lo, hi = self.crop_scale
        _require(0 < lo <= hi <= 1, f"data.crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        _require(0 <= self.hflip <= 1, f"data.hflip is a probability, got {self.hflip}")
        _require(0 < self.eval_crop_pct <= 1, f"data.eval_crop_pct must be in (0, 1], got {self.eval_crop_pct}")
        _require(0 <= self.max_skip_frac <= 1, f"data.max_skip_frac must be in [0, 1], got {self.max_skip_frac}")
        _require(0 <= self.label_smoothing < 1, f"data.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _require(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "data.mixup_alpha/cutmix_alpha must be >= 0")
        _require(0 <= self.mix_prob <= 1, f"data.mix_prob is a probability, got {self.mix_prob}")
        _require(self.prefetch_factor >= 1, "data.prefetch_factor must be >= 1")


@dataclass
class OptimConfig:
    """AdamW + warmup/cosine; the schedule runs on samples seen (see pipeline/train/recipe.py)."""

    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 20
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: float = 1.0  # 0 disables clipping

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}")
        _require(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _require(all(0 <= b < 1 for b in self.betas), f"optim.betas must be in [0, 1), got {self.betas}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _require(self.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)")


@dataclass
class TrainConfig:
    """Length, batch arithmetic, precision and ZeRO settings of the training loop."""

    run_dir: str = ""  # "": runs/<name>-<recipe overrides> (see default_run_dir)
    steps: int = 200  # optimizer steps at the configured global batch
    micro_batch_size: int = 32  # per rank, per forward pass
    grad_accum: int = 0  # 0: derived from global_batch_size (or 1)
    global_batch_size: int = 0  # 0: micro_batch_size x grad_accum x world size
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # 0: evaluate only at the end
    peak_tflops: float = 0.0  # per device, for train/mfu; 0: look up the device (unknown: no MFU)
    max_nonfinite_steps: int = 3  # consecutive skipped steps before rolling back
    cpu_threads: int = 0  # torch threads per rank on CPU; 0: the rank's CPU allocation minus loader workers
    objective: Literal["classify", "mae"] = "classify"  # mae: masked-autoencoder pretraining (the mae section)
    # torch.compile the model (inductor; DeepSpeed's engine.compile, state dict keys unchanged): the
    # first steps pay the compile time (tens of seconds), later ones run faster on a GPU
    compile: bool = False

    def __post_init__(self) -> None:
        _require(self.steps > 0, f"train.steps must be > 0, got {self.steps}")
        _require(self.micro_batch_size > 0, f"train.micro_batch_size must be > 0, got {self.micro_batch_size}")
        _require(
            self.grad_accum >= 0 and self.global_batch_size >= 0, "train.grad_accum/global_batch_size must be >= 0"
        )
        _require(
            self.zero_stage in (0, 1, 2, 3),
            f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}",
        )
        _require(
            not self.offload_params or self.zero_stage == 3,
            "train.offload_params needs train.zero_stage=3 (ZeRO-Infinity offloads partitioned params only)",
        )
        _require(
            not self.offload_optimizer or self.zero_stage >= 1,
            "train.offload_optimizer needs train.zero_stage >= 1",
        )
        _require(self.log_every > 0, "train.log_every must be > 0")
        _require(self.eval_every >= 0, "train.eval_every must be >= 0")
        _require(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps must be >= 1")
        _require(
            not (self.compile and self.zero_stage == 3),
            "train.compile=true does not work with train.zero_stage=3: ZeRO-3 gathers each layer's partitioned "
            "weights in module hooks that torch.compile traces past (the patch embedding then reads its weight as "
            "an empty shard); use train.zero_stage=2 (or 0/1) with train.compile=true, or train.compile=false",
        )

    def grad_accum_for(self, world_size: int) -> int:
        """Micro batches per optimizer step at ``world_size`` ranks (pipeline/train/batch.py plans with it).

        global batch = micro batch x accumulation x world size. A fixed global batch with a
        derived accumulation (grad_accum=0) keeps the recipe when the node count changes; the
        config keeps the user's 0s so it stays valid at any node count.
        """
        per_pass = self.micro_batch_size * world_size
        if self.global_batch_size and self.grad_accum:
            _require(
                self.global_batch_size == per_pass * self.grad_accum,
                f"train.global_batch_size={self.global_batch_size} != train.micro_batch_size="
                f"{self.micro_batch_size} x train.grad_accum={self.grad_accum} x world size={world_size} "
                f"(= {per_pass * self.grad_accum}); set train.grad_accum=0 to derive it",
            )
            return self.grad_accum
        if self.global_batch_size:
            _require(
                self.global_batch_size % per_pass == 0,
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size} x world size={world_size} (= {per_pass}); "
                f"change the global or micro batch, or the number of nodes",
            )
            return self.global_batch_size // per_pass
        return self.grad_accum or 1


@dataclass
class CheckpointConfig:
    """Sharded ZeRO checkpoints under <run_dir>/checkpoints, committed atomically."""

    every_steps: int = 100  # 0: only at the end and on SLURM's pre-timeout signal
    keep_last: int = 3
    resume: Literal["auto", "require"] = "auto"  # require: refuse to start without a checkpoint
    export_final: bool = True  # consolidated fp32 safetensors under <run_dir>/export
    # Periodic saves: snapshot to host memory at the step, write and commit in the background
    # (pipeline/train/saving.py). Off by default: it holds one checkpoint shard per rank in host
    # memory for the whole run (`--dry-run` plans it). Saves on USR2/TERM and at the end stay synchronous.
    async_save: bool = False
    allow_recipe_change: bool = (
        False  # resume a run dir whose recipe differs (refused otherwise; pipeline/train/resume.py)
    )

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "checkpoint.every_steps must be >= 0")
        _require(self.keep_last >= 1, "checkpoint.keep_last must be >= 1 (the newest is needed to resume)")


@dataclass
class TrackingConfig:
    """MLflow: a local SQLite store by default, a server when a URI is given."""

    enabled: bool = True
    uri: str = ""  # "": $MLFLOW_TRACKING_URI, else sqlite:///<run_dir parent>/mlflow.db
    experiment: str = ""  # "": the config family (the folder of the config file)
    run_name: str = ""  # "": derived from the config name and the overrides
    system_metrics: bool = True
    timeout_s: float = 5.0  # per HTTP request; a down server never stalls training
    max_retries: int = 2
    retry_s: float = 10.0  # while the server is down, how often to check whether it is back
    tags: dict[str, str] = field(default_factory=dict)
    # "": no registration; else the Model Registry name the run's model (a fine-tune's best
    # evaluation, else the final export) is registered under at the end of the run
    register_as: str = ""

    def __post_init__(self) -> None:
        if self.register_as:
            why = registry_name_problem(self.register_as)
            _require(why is None, f"tracking.register_as={self.register_as!r}: {why}")
        _require(self.timeout_s > 0, "tracking.timeout_s must be > 0")
        _require(self.max_retries >= 0, "tracking.max_retries must be >= 0")
        _require(self.retry_s > 0, f"tracking.retry_s must be > 0 (seconds between checks), got {self.retry_s}")
        refuse_uri_credentials(self.uri, "tracking.uri")


def registry_name_problem(name: str) -> str | None:
    """Why MLflow's Model Registry would refuse ``name`` (its rules, mlflow.utils.validation), or None."""
    fix = posixpath.normpath(name.replace("/", "-").replace(":", "-").strip()).lstrip("./") or "my-model"
    if not name.strip():
        return "a registered model name cannot be blank; e.g. tracking.register_as=my-model"
    if "/" in name or ":" in name:
        return f"a registered model name cannot contain '/' or ':'; e.g. tracking.register_as={fix}"
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(".."):
        return f"MLflow refuses '.' and names starting with '..' (they read as paths); e.g. tracking.register_as={fix}"
    return None


def redact_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***`` (for messages and files)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


_URL_PASSWORD = re.compile(r"(\w+://[^/\s:@]*):[^@/\s]*@")


def redact_text(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def refuse_uri_credentials(uri: str, source: str) -> None:
    """Credentials inside a tracking URI would be written wherever the URI is (job.json, config.yaml,
    tracking.json, checkpoints, logs): refuse them and point to the variables MLflow reads instead."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return  # not a URL at all: the tracker names the scheme problem
    if "@" not in parts.netloc or parts.scheme not in ("http", "https"):
        return
    user = parts.username or "USER"
    raise ConfigError(
        f"{source}={redact_uri(uri)!r} has credentials in it, which would be written in plain text to job.json, "
        f"config.yaml, tracking.json, the checkpoints and the logs; remove them from the URI "
        f"({parts.scheme}://{parts.netloc.rpartition('@')[2]}) and export MLFLOW_TRACKING_USERNAME={user} and "
        f"MLFLOW_TRACKING_PASSWORD=... in the environment of the launcher and the job instead"
    )


@dataclass
class LaunchConfig:
    """Where and how ranks run; `launch/submit.py` flags override these."""

    executor: Literal["auto", "slurm", "local"] = "auto"
    nodes: int = 1
    gpus_per_node: int = 0  # tasks per node on GPUs; 0: CPU ranks
    ranks_per_node: int = 2  # CPU ranks per node when gpus_per_node is 0
    cpus_per_task: int = 0  # 0: the scheduler's default
    mem: str = ""  # e.g. "64G"; "": the scheduler's default
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclude: str = ""
    job_name: str = ""
    time_min: int = 60
    signal_delay_s: int = 120  # USR2 this long before the time limit: time to save
    max_timeouts: int = 3  # requeues after time-outs; preemptions are not bounded
    container: str = ""  # an Apptainer .sif to run each rank in
    port: int = 0  # rendezvous port; 0: derived from the job id
    gpu_mem_gb: float = 0.0  # memory of one GPU, for the --dry-run memory plan; 0: unknown
    # images/s one GPU should train, for the --dry-run CPU budget of decoding; 0: the model at 45 % MFU
    # of an H100 (ViT-B/16: ~4,200), see launch/data_budget.py
    target_img_per_s_per_gpu: float = 0.0

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else self.ranks_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def __post_init__(self) -> None:
        _require(self.nodes >= 1, f"launch.nodes must be >= 1, got {self.nodes}")
        _require(self.gpus_per_node >= 0, "launch.gpus_per_node must be >= 0")
        _require(self.ranks_per_node >= 1, "launch.ranks_per_node must be >= 1")
        _require(self.time_min >= 1, "launch.time_min must be >= 1")
        _require(
            0 <= self.signal_delay_s < self.time_min * 60, "launch.signal_delay_s must be shorter than the time limit"
        )
        _require(self.max_timeouts >= 0, "launch.max_timeouts must be >= 0")
        _require(0 <= self.port < 65536, f"launch.port must be a TCP port, got {self.port}")
        _require(self.gpu_mem_gb >= 0, f"launch.gpu_mem_gb must be >= 0 (0: unknown), got {self.gpu_mem_gb}")
        _require(self.target_img_per_s_per_gpu >= 0, "launch.target_img_per_s_per_gpu must be >= 0 (0: derived)")


@dataclass
class FinetuneConfig:
    """Start from a pretrained checkpoint with a new head (empty init_from: pretraining)."""

    init_from: str = ""  # run dir, sharded checkpoint dir, export dir/file, or timm/seed state dict
    num_classes: int = 0  # downstream classes; required with init_from
    head_init: Literal["zero", "trunc_normal"] = "zero"
    layer_decay: float = 1.0  # per-block LR multiplier (BEiT/MAE); 1.0 disables
    freeze: Literal["none", "backbone"] = "none"  # backbone: linear probe
    freeze_blocks: int = 0  # freeze patch embedding and the first K blocks
    export_best: bool = True

    @property
    def enabled(self) -> bool:
        return self.init_from != ""

    def __post_init__(self) -> None:
        _require(0 < self.layer_decay <= 1, f"finetune.layer_decay must be in (0, 1], got {self.layer_decay}")
        _require(self.freeze_blocks >= 0, "finetune.freeze_blocks must be >= 0")
        _require(
            not self.init_from or self.num_classes > 0,
            "finetune.num_classes is missing: set it to the number of downstream classes "
            "(e.g. finetune.num_classes=10) when finetune.init_from is set",
        )


def default_run_dir(name: str, overrides: Sequence[str] = ()) -> str:
    """Where a run lives when train.run_dir is not set: ``runs/<config name>-<recipe overrides>``
    (``runs/vit_b16-lr3e-4``; see recipe.run_label), so another recipe never resumes this run."""
    return f"runs/{run_label(name, overrides)}"


@dataclass
class MAEConfig:
    """Masked-autoencoder pretraining (``train.objective=mae``); defaults are MAE's (He et al. 2022)."""

    mask_ratio: float = 0.75  # fraction of each image's patches hidden from the encoder
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True  # predict per-patch normalised pixels (MAE table 1c)
    # Monitoring at each eval (pipeline/mae/monitor.py): a weighted k-NN top-1 on the encoder's
    # features (DINO's monitor, Caron et al. 2021: k=20, T=0.07) with a bank of this many train
    # images, a fixed draw (0: no k-NN); and a picture of this many val images, masks, reconstructions.
    knn_bank: int = 10000
    knn_k: int = 20
    knn_temperature: float = 0.07
    recon_images: int = 8

    def __post_init__(self) -> None:
        _require(0 < self.mask_ratio < 1, f"mae.mask_ratio must be in (0, 1), got {self.mask_ratio} (MAE uses 0.75)")
        for key in ("knn_bank", "recon_images"):
            _require(getattr(self, key) >= 0, f"mae.{key} must be >= 0 (0: off), got {getattr(self, key)}")
        _require(self.knn_k >= 1, f"mae.knn_k must be >= 1, got {self.knn_k} (DINO uses 20)")
        _require(self.knn_temperature > 0, f"mae.knn_temperature must be > 0, got {self.knn_temperature} (DINO: 0.07)")
        for key in ("decoder_dim", "decoder_depth", "decoder_heads"):
            _require(getattr(self, key) > 0, f"mae.{key} must be > 0, got {getattr(self, key)}")
        _require(
            self.decoder_dim % self.decoder_heads == 0 and self.decoder_dim % 4 == 0,
            f"mae.decoder_dim={self.decoder_dim} must be a multiple of mae.decoder_heads={self.decoder_heads} "
            f"and of 4 (the 2-D sin-cos position embedding); e.g. mae.decoder_dim=512 mae.decoder_heads=16",
        )

    def model_kwargs(self) -> dict:
        """Keyword arguments for ``pipeline.model.mae.MaskedAutoencoder`` (besides the ViT's)."""
        keys = ("mask_ratio", "decoder_dim", "decoder_depth", "decoder_heads", "norm_pix_loss")
        return {k: getattr(self, k) for k in keys}


@dataclass
class Config:
    name: str = "default"  # the config's name; "": the config file's stem
    family: str = ""  # the config file's folder (configs/pretrain/x.yaml: "pretrain"); "": none
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)

    def __post_init__(self) -> None:
        self.train.grad_accum_for(self.launch.world_size)  # refuse bad batch arithmetic at load time
        if not self.train.run_dir:
            self.train.run_dir = default_run_dir(self.name)
        self._check_objective()
        _require(
            not (self.data.decoder == "nvjpeg" and self.train.device == "cpu"),
            "data.decoder=nvjpeg decodes JPEGs on the GPU, and train.device=cpu trains on the CPU; set "
            "data.decoder=pil (or torchvision) for CPU training, or train.device=auto/cuda on a GPU node",
        )
        if self.finetune.enabled:
            self._head_follows_finetune()
        _require(
            self.finetune.freeze_blocks <= self.model.depth,
            f"finetune.freeze_blocks={self.finetune.freeze_blocks} exceeds model.depth={self.model.depth}",
        )

    def _head_follows_finetune(self) -> None:
        """The new head replaces the pretraining one: finetune.num_classes is its one source of truth.

        model.num_classes left at its default takes the value; set to anything else it is a conflict,
        refused rather than silently overwritten (which of the two did the user mean?).
        """
        want, have = self.finetune.num_classes, self.model.num_classes
        _require(
            have in (want, ModelConfig.num_classes),
            f"model.num_classes={have} conflicts with finetune.num_classes={want}: fine-tuning replaces the head, "
            f"whose size is finetune.num_classes; drop model.num_classes from the config (or set it to {want})",
        )
        self.model.num_classes = want

    def _check_objective(self) -> None:
        """MAE reconstructs pixels: label mixing and smoothing have no meaning there, a fine-tune classifies."""
        if self.train.objective != "mae":
            return
        d = self.data
        label_keys = {"data.mixup_alpha": d.mixup_alpha, "data.cutmix_alpha": d.cutmix_alpha,
                      "data.label_smoothing": d.label_smoothing}  # fmt: skip
        set_keys = [f"{k}={v}" for k, v in label_keys.items() if v]
        _require(
            not set_keys,
            f"train.objective=mae reconstructs masked pixels and uses no labels, so {', '.join(set_keys)} means "
            f"nothing there; set {' '.join(k.split('=')[0] + '=0' for k in set_keys)} or train.objective=classify",
        )
        _require(
            not self.finetune.enabled,
            "finetune.init_from is set with train.objective=mae; fine-tuning trains a classifier: set "
            "train.objective=classify (or drop finetune.init_from to pretrain with MAE)",
        )

    @property
    def labels_needed(self) -> bool:
        """Whether the objective trains on labels (MAE reconstructs pixels; labels only feed its monitor)."""
        return self.train.objective != "mae"

    @property
    def head_key(self) -> str:
        """The key that sets the classifier's outputs (model.num_classes follows it when fine-tuning)."""
        return "finetune.num_classes" if self.finetune.enabled else "model.num_classes"

    @property
    def world_size(self) -> int:
        return self.launch.world_size
