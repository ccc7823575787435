"""Every metric key the project logs, in one table (STYLE 9: keys are namespaced ``area/name``).

==============================  ===============================================  ==================================
key                             unit                                             logged by
==============================  ===============================================  ==================================
``train/loss``                  mean loss over the log window (cross-entropy;    train/loop.py, every log_every steps
                                MAE: masked-patch MSE)
``train/lr``                    learning rate at the logged step                 train/loop.py
``train/img_per_s``             images per second, all ranks together            train/loop.py
``train/samples_seen``          samples since the run began                      train/loop.py
``train/skipped_steps``         optimizer steps skipped for non-finite values    train/loop.py
``train/epoch``                 epoch of the train stream                        train/loop.py
``train/grad_norm``             global L2 norm of the gradients                  train/loop.py (when DeepSpeed has it)
``train/mfu``                   fraction of the device's peak FLOP/s             train/loop.py (when the peak is known)
``train/step_time_s``           seconds per step                                 tracking/bench.py only
``data/wait_frac``              fraction of the window spent waiting for data    train/loop.py
``data/samples_read``           samples read, summed over ranks                  data/samples.py counts, loop logs
``data/skipped_<kind>``         samples skipped, one key per tario.SKIP_KINDS    data/samples.py counts, loop logs
``data/gpu_decode_fallbacks``   samples ``data.decoder=nvjpeg`` decoded on the   data/slots.py and data/train_stream.py
                                CPU (not a JPEG nvJPEG takes, or it raised)      count, loop logs
``eval/top1``                   fraction of val images, top-1 correct            train/stage.py, every eval_every steps
``eval/top5``                   fraction of val images, top-5 correct            train/stage.py
``eval/loss``                   mean loss over the val split (as train/loss)     the stage's evaluate (train/loop.py)
``eval/knn_top1``               fraction of val images whose 20 nearest train    mae/stage.py (labeled data only)
                                images (encoder features, cosine) vote right
``eval/best_top1``              the best eval/top1 so far (a fine-tune's         finetune/best.py, when it improves
                                export/best holds its weights)
``system/...``                  MLflow's system metrics (``system/<node>/...``)  tracking/backend.py (MLflow's monitor)
==============================  ===============================================  ==================================

Counters that stay zero in a healthy run (``data/skipped_*``, ``train/skipped_steps``,
``data/gpu_decode_fallbacks``) reach MLflow only from their first non-zero value on
(tracking/tracker.py): flat zero charts would push the loss and top-1 off the UI's first screen.
``metrics.jsonl`` has them at every logged step.

The same names go to both local records of a run, which are two files on purpose:
``<run_dir>/metrics.jsonl`` (train/metrics_log.py: rank 0's plain per-step record, written with
tracking off too, one value per key and step) and ``<run_dir>/tracking_wal.jsonl``
(tracking/state.py: the tracker's write-ahead log of everything bound for MLflow, params and tags
included, append-only so a killed job loses nothing). See those modules for why they are not one.

A leaf module (no imports): the data loader, the tracker, the loop and the launcher all name keys
from here without importing each other.
"""

from __future__ import annotations

TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_IMG_PER_S = "train/img_per_s"
TRAIN_SAMPLES_SEEN = "train/samples_seen"
TRAIN_SKIPPED_STEPS = "train/skipped_steps"
TRAIN_EPOCH = "train/epoch"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_MFU = "train/mfu"
TRAIN_STEP_TIME_S = "train/step_time_s"

DATA_WAIT_FRAC = "data/wait_frac"
DATA_SAMPLES_READ = "data/samples_read"
DATA_SKIPPED_PREFIX = "data/skipped_"
DATA_GPU_DECODE_FALLBACKS = "data/gpu_decode_fallbacks"

EVAL_TOP1 = "eval/top1"
EVAL_TOP5 = "eval/top5"
EVAL_LOSS = "eval/loss"
EVAL_KNN_TOP1 = "eval/knn_top1"
EVAL_BEST_TOP1 = "eval/best_top1"

SYSTEM_PREFIX = "system/"

# The headline metrics, named the same in pretraining and fine-tuning so runs of both stages line up
# in the MLflow UI and in `launch/compare.py`.
HEADLINE_METRICS: tuple[str, ...] = (EVAL_TOP1, EVAL_LOSS, TRAIN_LOSS, TRAIN_IMG_PER_S, TRAIN_MFU)


# Key prefixes the tracker leaves out of MLflow while their value is zero (see the module doc).
QUIET_WHILE_ZERO: tuple[str, ...] = (DATA_SKIPPED_PREFIX, TRAIN_SKIPPED_STEPS, DATA_GPU_DECODE_FALLBACKS)


def data_skipped(kind: str) -> str:
    """``data/skipped_<kind>``: the counter of samples skipped for one of tario.SKIP_KINDS."""
    return DATA_SKIPPED_PREFIX + kind
