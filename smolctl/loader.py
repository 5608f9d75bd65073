"""The DataLoader side of the data pipeline: background processes that tokenize a BlockStream's
chunks (data.py) and hand them back to the trainer, which packs them in document order.

    for batch, state in batches(stream, 2):    # tokenized in 2 worker processes, packed here
        ...

Each worker reads every chunk and tokenizes every N-th; the DataLoader hands their items back
in request order, so the blocks and the states are the same for any number of workers. The
workers ignore Ctrl-C and SIGTERM (the trainer's to handle) and never outlive their trainer.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from smolctl.errors import SmolctlError


@dataclass
class Failed:
    """What a worker hands the packer instead of a chunk when a SmolctlError stopped it: the
    packer raises it again, in the trainer, as one line (no traceback through the worker)."""

    message: str
    hint: str | None
    exit_code: int

    def error(self) -> SmolctlError:
        return SmolctlError(self.message, hint=self.hint, exit_code=self.exit_code)


def batches(stream, num_workers: int | None = None) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
    """Iterate a BlockStream: the documents tokenized in `num_workers` background processes (0:
    in this one; None: `auto_workers()`), packed here, in document order. The blocks and the
    states are the same for any number of workers, so a run may resume with another number."""
    workers = auto_workers() if num_workers is None else num_workers
    pin = torch.cuda.is_available()  # page-locked batches make `.to(cuda, non_blocking=True)` asynchronous
    if workers == 0:
        for batch, state in stream:
            yield (batch.pin_memory() if pin else batch), state
        return
    # batch_size=None, collate_fn: a chunk passes as it is (the default `default_convert` walks it).
    # Worker w gets the w-th, (w+N)-th... request and in_order hands the results back in request
    # order: worker w's items are chunks w, w+N, ... (the packer checks each index).
    loader = torch.utils.data.DataLoader(_Chunks(stream), batch_size=None, num_workers=workers,
                                         collate_fn=_as_is, prefetch_factor=4, in_order=True,
                                         worker_init_fn=_worker_init)
    it = iter(loader)
    try:
        for batch, state in stream.pack(it):
            yield (batch.pin_memory() if pin else batch), state
    finally:
        _stop_workers(it)


def auto_workers() -> int:
    """The default number of data workers: one per CPU core this process can spare -- the cores it
    may use, shared by the training processes on this machine, less one for the trainer itself --
    from 1 to 4. One worker tokenizes ~0.3-0.45M tokens/s on one core of a recent Xeon, two
    ~0.5-0.75M (benchmarks/README.md); one H200 training SmolLM2-135M at 45% MFU consumes ~0.36M."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's (and so accelerate launch's)
    return max(1, min(4, cores // max(1, processes) - 1))


class _Chunks(torch.utils.data.IterableDataset):
    """A BlockStream's chunks, as one DataLoader worker of several sees them: its own share."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        try:
            yield from self.stream.chunks(info.id, info.num_workers)
        except SmolctlError as e:  # no traceback through the worker: the packer raises it in the trainer
            yield Failed(e.message, e.hint, e.exit_code)


def _as_is(item):
    return item


def _stop_workers(it) -> None:
    """Shut the workers down now, however the iteration ended. Left to garbage collection, an
    iterator kept alive by an exception's traceback outlives the trainer's last line, and at exit
    the interpreter waits forever for a worker that ignores SIGTERM (seen: a crash that hung)."""
    shutdown = getattr(it, "_shutdown_workers", None)  # DataLoader's own orderly shutdown
    if shutdown is not None:
        shutdown()
    for worker in getattr(it, "_workers", ()):
        if worker.is_alive():
            worker.kill()


def _worker_init(worker_id: int) -> None:
    """Ctrl-C and SIGTERM are the trainer's to handle (finish the step, save): the worker must
    outlive them, also when they reach the whole process group (a terminal, a scheduler).

    But never its trainer: a worker whose trainer died (SIGKILL, OOM killer) would live on, blocked
    on a full queue that nobody reads, holding the launcher's stdout open (seen: 70 minutes). So
    it gets SIGKILL when the trainer dies (Linux: PR_SET_PDEATHSIG), and, everywhere, a watchdog
    thread exits it once its parent is gone.

    Each worker is one core's worth of tokenizing: the tokenizer's own thread pool stays off."""
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True, name="smolctl-orphan-check").start()


def _exit_when_orphaned(parent: int, every_s: float = 0.5) -> None:
    while os.getppid() == parent:  # re-parented (to init or a subreaper) once the trainer is gone
        time.sleep(every_s)
    os._exit(1)
