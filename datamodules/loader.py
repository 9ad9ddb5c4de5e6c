"""Batching and a DataLoader whose train position survives checkpoints.

Lightning saves `state_dict()` of a train dataloader that has one and restores it before
iterating again. The position saved is the number of batches the *model consumed* (reported by
the datamodule from `on_before_batch_transfer`), not the number fetched: Lightning prefetches,
so counting fetches would skip a batch on every resume.

Workers hand over uint8 clips; the float conversion (`pixels.to_model`) runs as batches leave
the loader, or on the accelerator with normalize_on_device. Shipping float32 out of the workers
costs 4x the shared memory, and faulting in that fresh memory for every batch cost a visible share
of the workers' throughput (benchmarks/data_throughput.py).
"""

from __future__ import annotations

import gc
import math
import signal
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, get_worker_info

from maskvid.datamodules.pixels import to_model
from maskvid.datamodules.samples import collate_meta
from maskvid.datamodules.streams import TrainStream


def _worker_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor; in a DataLoader worker it lives in shared memory from the start, so
    handing the batch to the main process costs no extra copy (as default_collate does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def collate_clips(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples: video uint8 [B,T,H,W,C] (VideoLoader turns it into float [B,C,T,H,W]),
    caption, frame_mask, meta. Token-shard samples go to `collate_tokens`."""
    if "tokens" in samples[0]:
        from maskvid.datamodules.token_samples import collate_tokens

        return collate_tokens(samples)
    t, h, w, c = samples[0]["video"].shape
    video = torch.stack([s["video"] for s in samples], out=_worker_buffer((len(samples), t, h, w, c), torch.uint8))
    metas = [s["meta"] for s in samples]
    return {
        "video": video,
        "caption": [s["caption"] for s in samples],
        "frame_mask": torch.stack([s["frame_mask"] for s in samples]),
        "meta": collate_meta(metas),
    }


# Preemption signals the trainer's main process handles (launch/preemption.py). Sent to the whole
# process group (Kubernetes, spot instances, SLURM's `--signal`), they would otherwise reach the
# workers too, and PyTorch's worker handler dies on a SIGTERM not sent by its parent, taking the
# run down before it has saved. The main process still stops its workers by itself.
WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class _IgnorePreemptionSignals:
    """worker_init_fn: ignore WORKER_IGNORED_SIGNALS, then run the caller's own init, if any."""

    def __init__(self, then: Optional[Callable[[int], None]] = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        for signum in WORKER_IGNORED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


class VideoLoader(DataLoader):
    """DataLoader that yields the batch contract: video float [B,C,T,H,W] in [-1, 1].

    normalize=False leaves video as uint8 [B,T,H,W,C] for conversion on the device.
    Workers ignore SIGTERM and SIGUSR1 (see WORKER_IGNORED_SIGNALS).
    """

    def __init__(self, dataset: Any, normalize: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("collate_fn", collate_clips)
        kwargs["worker_init_fn"] = _IgnorePreemptionSignals(kwargs.get("worker_init_fn"))
        super().__init__(dataset, **kwargs)
        self.normalize = normalize

    def __iter__(self):
        if self.num_workers == 0:
            return self._normalized(super().__iter__())
        # FFmpeg contexts decoded in this process own thread pools whose threads do not exist
        # in a forked worker; if the worker's garbage collector frees such an inherited object,
        # FFmpeg waits for those threads forever (a hung DataLoader). So: collect here, and
        # fork with everything frozen, which the workers' collectors then never touch.
        gc.collect()
        gc.freeze()
        try:
            iterator = super().__iter__()  # forks the workers
        finally:
            gc.unfreeze()
        return self._normalized(iterator)

    def _normalized(self, iterator):
        for batch in iterator:
            if self.normalize and "video" in batch:
                batch["video"] = to_model(batch["video"])
            yield batch


class ResumableLoader(VideoLoader):
    """DataLoader over a TrainStream with `state_dict`/`load_state_dict` and optional epochs.

    batches_per_epoch: when set, an epoch ends after that many batches and the next epoch
        continues the same stream; when None the stream is one endless epoch (use max_steps).
    """

    def __init__(self, dataset: TrainStream, batches_per_epoch: Optional[int] = None, **kwargs: Any) -> None:
        kwargs.setdefault("batch_size", dataset.batch_size)
        super().__init__(dataset, **kwargs)
        self.batches_per_epoch = batches_per_epoch
        self._fetched = 0
        self._consumed: Optional[int] = None
        self._skipped_done = 0  # bad samples counted by finished iterators
        self._skipped_now: dict[int, int] = {}

    @property
    def position(self) -> int:
        """Batches of this rank's stream that the model has consumed."""
        return self._consumed if self._consumed is not None else self._fetched

    @property
    def skipped(self) -> int:
        return self._skipped_done + sum(self._skipped_now.values())

    def mark_consumed(self, batch_index: int) -> None:
        self._consumed = batch_index + 1

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("an endless train stream has no length; set batches_per_epoch")
        return self.batches_per_epoch

    def __iter__(self):
        start = self.position
        self.dataset.start_batch = start
        self._fetched, self._consumed = start, None
        self._skipped_done += sum(self._skipped_now.values())
        self._skipped_now = {}
        return self._batches(super().__iter__())  # VideoLoader's, already normalised

    def _batches(self, iterator):
        served = 0
        for batch in iterator:
            batch["meta"]["batch_index"] = self._fetched
            self._skipped_now[batch["meta"]["worker"]] = batch["meta"]["skipped"]
            self._fetched += 1
            yield batch
            served += 1
            if self.batches_per_epoch is not None and served >= self.batches_per_epoch:
                return

    def state_dict(self) -> dict[str, Any]:
        ds: TrainStream = self.dataset
        return {
            "batches": self.position,
            "seed": ds.seed,
            "batch_size": ds.batch_size,
            "num_workers": self.num_workers,
            "world_size": ds.world_size,
            "image_ratio": getattr(ds, "image_ratio", 0.0),
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._fetched = int(state["batches"])
        self._consumed = None
        self._skipped_done = int(state.get("skipped", 0))
        self._skipped_now = {}
