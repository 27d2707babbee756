"""Stage-1 batches made on the host one step ahead, by a background thread, and copied to the device.

Why: when the volume stays on the host (it does not fit in a quarter of the GPU, or ``device_resident="off"``), the
CPU sampler (``VolumePointSampler``) draws indices, shuffles, gathers voxels and interpolates targets on the CPU
while the GPU waits. ``PrefetchingSampler`` wraps a sampler that makes its batches on the CPU: a worker thread
makes the next batch (prefetch depth 1) while the GPU trains on the current one; on CUDA each batch is copied into
reusable page-locked (pinned) staging buffers, two sets used in turn, and sent with ``non_blocking=True``.

Exactly the plain sampler's batches: the worker makes batch k+1 for step s+1 (same size) right after batch k was
handed out; a request that does not match the prediction (another size, or a step of the other phase, coarse or
not: ``batch_key``) discards it, restores the sampler to where it stood and makes the requested batch. The state
``get_state`` returns is the one saved after the last batch handed out, not the prefetched one, so a run resumed
from a checkpoint draws the batches an uninterrupted run draws. The sampler itself is only touched by one thread
at a time: the worker while a request is in flight, the caller otherwise.

Device-agnostic: forced on for CPU tensors in tests (``staging=True`` without pinning exercises the buffer reuse).
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from gridinr_nerfstudio.thread_policy import follow_policy_threads

_STOP = object()


class _Staging:
    """Two sets of host buffers used in turn (page-locked when `pin`), each reused once its last copy to the
    device is done (a CUDA event recorded after the copy)."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.buffers: list = [None, None]
        self.events: list = [None, None]

    def stage(self, tensors: Sequence[torch.Tensor], slot: int) -> Tuple[torch.Tensor, ...]:
        """The tensors copied into set `slot` (reallocated when shapes change)."""
        if self.events[slot] is not None:
            self.events[slot].synchronize()
            self.events[slot] = None
        buffers = self.buffers[slot]
        if buffers is None or [(b.shape, b.dtype) for b in buffers] != [(t.shape, t.dtype) for t in tensors]:
            buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin) for t in tensors]
            self.buffers[slot] = buffers
        for buffer, tensor in zip(buffers, tensors):
            buffer.copy_(tensor)
        return tuple(buffers)


def _work(sampler, staging: Optional[_Staging], requests: queue.Queue, results: queue.Queue) -> None:
    """The worker thread: (count, step, slot) requests in, (tensors, state after the batch, error) out."""
    while True:
        request = requests.get()
        if request is _STOP:
            return
        count, step, slot = request
        try:
            follow_policy_threads()  # the training thread's setting may have changed since the last batch
            tensors = tuple(sampler.batch(count, step))
            state = sampler.get_state()
            if staging is not None:
                tensors = staging.stage(tensors, slot)
            results.put((tensors, state, None))
        except BaseException as error:  # noqa: BLE001 - handed to the caller, raised there
            results.put((None, None, error))


def _stop(requests: queue.Queue, thread: threading.Thread) -> None:
    """Ask the worker to stop and wait for it: a worker still inside torch while the interpreter exits aborts the
    process ("terminate called without an active exception")."""
    requests.put(_STOP)
    if thread is not threading.current_thread():
        thread.join(timeout=60)


class PrefetchingSampler:
    """Wraps a point sampler (``VolumePointSampler`` on the CPU, ``SequencePointSampler`` of them) whose
    ``batch(count, step)`` returns a tuple of CPU tensors and ``batch_key(step)`` says which steps draw alike;
    hands the same batches out on ``device``."""

    def __init__(self, sampler, device: Union[torch.device, str] = "cpu", pin: Optional[bool] = None,
                 staging: Optional[bool] = None):
        self.sampler = sampler
        self.device = torch.device(device)
        cuda = self.device.type == "cuda" and torch.cuda.is_available()
        pin = cuda if pin is None else bool(pin) and torch.cuda.is_available()
        self._staging = _Staging(pin) if (pin if staging is None else staging) else None
        self._state = sampler.get_state()  # after the last batch handed out
        self._pending: Optional[Tuple[int, int]] = None  # (count, step) of the batch in flight
        self._slot = 0  # staging set of the next batch
        self._requests: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._closed = False
        # The thread holds no reference to self: an unclosed sampler is collected and its thread then stops.
        self._thread = threading.Thread(target=_work, args=(sampler, self._staging, self._requests, self._results),
                                        name="gridinr-prefetch", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop, self._requests, self._thread)

    @property
    def pin(self) -> bool:
        """Whether batches pass through page-locked staging buffers."""
        return self._staging is not None and self._staging.pin

    # The caller's side.
    def _submit(self, count: int, step: int) -> None:
        self._requests.put((count, step, self._slot))
        self._pending = (count, step)

    def _collect(self):
        """Wait for the batch in flight: (tensors on the host, sampler state after it)."""
        tensors, state, error = self._results.get()
        self._pending = None
        if error is not None:
            self.sampler.set_state(self._state)  # as if the failed batch had not been asked for
            raise error
        return tensors, state

    def _discard(self) -> None:
        """Drop the prefetched batch, if any, and put the sampler back to where the handed-out batches left it."""
        if self._pending is not None:
            try:
                self._collect()
            except Exception:  # noqa: BLE001 - a batch nobody asked for; its error does not concern the caller
                pass
            self.sampler.set_state(self._state)

    def _key(self, step: int):
        return self.sampler.batch_key(step)

    def batch(self, count: int, step: int) -> Tuple[torch.Tensor, ...]:
        """The sampler's ``batch(count, step)``, on ``device``; the next one (``step + 1``) starts at once."""
        if self._closed:
            raise RuntimeError("PrefetchingSampler is closed")
        if self._pending is not None:
            pending_count, pending_step = self._pending
            if pending_count != count or self._key(pending_step) != self._key(step):
                self._discard()
        if self._pending is None:
            self._submit(count, step)
        tensors, state = self._collect()
        self._state = state
        slot = self._slot
        self._slot = 1 - slot
        out = self._to_device(tensors, slot)
        self._submit(count, step + 1)
        return out

    def _to_device(self, tensors: Tuple[torch.Tensor, ...], slot: int) -> Tuple[torch.Tensor, ...]:
        if self._staging is None:
            return tuple(t.to(self.device) for t in tensors)
        if self.device.type == "cpu":  # the staging buffers are reused: hand out copies
            return tuple(t.clone() for t in tensors)
        out = tuple(t.to(self.device, non_blocking=self._staging.pin) for t in tensors)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._staging.events[slot] = event
        return out

    def get_state(self) -> Dict[str, object]:
        """The sampler's state after the last batch handed out (not after the prefetched one)."""
        return self._state

    def set_state(self, state: Dict[str, object]) -> None:
        """Continue from ``get_state()`` (of this or a plain sampler): the prefetched batch is dropped."""
        self._discard()
        self.sampler.set_state(state)
        self._state = self.sampler.get_state()

    def eval_batch(self, count: int) -> Tuple[torch.Tensor, ...]:
        """The sampler's evaluation batch, on ``device``. Made in the caller's thread while the worker may be
        making the next training batch: evaluation draws from its own generator and only reads the volume."""
        return tuple(t.to(self.device) for t in self.sampler.eval_batch(count))

    def values_at(self, points: torch.Tensor) -> torch.Tensor:
        """The sampler's trilinear values at world points, on ``device`` (waits for the batch in flight: the
        sampler is not used from two threads)."""
        self._discard()
        return self.sampler.values_at(points.cpu()).to(self.device)

    @property
    def dense(self):
        """The sampler's in-memory volume (None when memory-mapped)."""
        return self.sampler.dense

    def close(self) -> None:
        """Stop the worker (the prefetched batch is dropped, the state kept); later ``batch`` calls raise."""
        if self._closed:
            return
        self._discard()
        self._closed = True
        self._finalizer()  # stops the worker (once)

