"""The engine: a bounded queue, dynamic batching and one worker thread that runs the model.

Requests that arrive within `batch_window_ms` of the first waiting one (up to `max_batch_size`) run as
one `Predictor.predict` call, which already groups requests with equal decoding settings into one
generate call. The model runs on a single worker thread, so the event loop keeps accepting, queueing
and answering (health, metrics, 503s) while a batch runs; requests that arrive meanwhile form the next
batch. A request that times out or whose client goes away leaves the queue; if its batch is already
running, its result is dropped. A batch that raises is retried one request at a time, so one bad
request fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from ofa_unified.inference import Request
from serving.config import ServeConfig
from serving.telemetry import ServeMetrics

logger = logging.getLogger("serving.engine")


class EngineError(Exception):
    """Base of the engine's refusals; handlers map each to an HTTP status."""


class QueueFullError(EngineError):
    pass


class EngineTimeoutError(EngineError):
    pass


class ShuttingDownError(EngineError):
    pass


class PredictorLike(Protocol):
    """What the engine and handlers use of `ofa_unified.inference.Predictor`."""

    vocab: Any
    vq: Any
    image_size: int
    model: Any

    def predict(self, requests: list[Request]) -> list[dict]: ...


class EngineClient(Protocol):
    """The interface handlers program against (the batching engine, or a stand-in)."""

    predictor: PredictorLike

    @property
    def queue_depth(self) -> int: ...

    async def generate(self, request: Request, timeout: float) -> dict: ...


@dataclass(eq=False)
class _Item:
    request: Request
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class BatchingEngine:
    """Dynamic batching over a `Predictor`; start() inside a running event loop, stop() to drain."""

    def __init__(self, predictor: PredictorLike, config: ServeConfig, metrics: ServeMetrics) -> None:
        self.predictor = predictor
        self.max_batch_size = config.max_batch_size
        self.window = config.batch_window_ms / 1000.0
        self.max_queue_depth = config.max_queue_depth
        self.metrics = metrics
        self._pending: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ofa-engine")
        self._task: asyncio.Task | None = None
        self._running = 0  # requests in the batch now on the worker thread
        self._accepting = False

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        return bool(self._pending) or self._running > 0

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._batch_loop(), name="ofa-batcher")
        self._accepting = True

    async def warmup(self, request: Request) -> dict:
        """Run one request straight on the worker thread (no queue limits): loads kernels, fills caches."""
        loop = asyncio.get_running_loop()
        return (await loop.run_in_executor(self._executor, self.predictor.predict, [request]))[0]

    async def generate(self, request: Request, timeout: float) -> dict:
        """Queue one request and wait for its result; raises EngineError subclasses or the
        exception the predictor raised for this request (ValueError for bad input)."""
        if not self._accepting:
            raise ShuttingDownError("the server is shutting down")
        if len(self._pending) >= self.max_queue_depth:
            raise QueueFullError(f"{len(self._pending)} requests are already waiting")
        item = _Item(request, asyncio.get_running_loop().create_future())
        self._pending.append(item)
        self.metrics.queue_depth.set(len(self._pending))
        self._wakeup.set()
        try:
            return await asyncio.wait_for(item.future, timeout)
        except asyncio.TimeoutError:
            raise EngineTimeoutError(f"no result within {timeout:g} s") from None
        finally:
            # Timed out or the client went away: leave the queue if the batch has not started.
            if not item.future.done():
                item.future.cancel()
            if item in self._pending:
                self._pending.remove(item)
                self.metrics.queue_depth.set(len(self._pending))

    async def _batch_loop(self) -> None:
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.window > 0 and len(self._pending) < self.max_batch_size:
                deadline = time.perf_counter() + self.window
                while len(self._pending) < self.max_batch_size:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except asyncio.TimeoutError:
                        break
            batch = [self._pending.popleft() for _ in range(min(self.max_batch_size, len(self._pending)))]
            self.metrics.queue_depth.set(len(self._pending))
            batch = [item for item in batch if not item.future.done()]
            try:
                if batch:
                    await self._run(batch)
            except Exception as e:  # keep the loop alive whatever happens to one batch
                logger.exception("batch failed")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)

    async def _run(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        for item in batch:
            self.metrics.queue_wait.observe(start - item.enqueued)
        self.metrics.batch_size.observe(len(batch))
        self._running = len(batch)
        try:
            outcomes = await loop.run_in_executor(
                self._executor, self._predict_isolated, [item.request for item in batch]
            )
        except Exception as e:  # the executor itself failed (e.g. shut down): fail the whole batch
            outcomes = [e] * len(batch)
        finally:
            self._running = 0
        self.metrics.batch_latency.observe(time.perf_counter() - start)
        logger.debug("ran batch", extra={"batch_size": len(batch), "seconds": time.perf_counter() - start})
        for item, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not item.future.done():
                    item.future.set_exception(outcome)
                continue
            task = item.request.task or "free"
            self.metrics.generated_tokens.labels(task).inc(len(outcome.get("tokens", ())))
            if not item.future.done():
                item.future.set_result(outcome)

    def _predict_isolated(self, requests: list[Request]) -> list[dict | BaseException]:
        """Runs on the worker thread. A failing batch is retried request by request, so the error
        lands on the request that caused it."""
        try:
            return list(self.predictor.predict(requests))
        except Exception as e:
            if len(requests) == 1:
                return [e]
        outcomes: list[dict | BaseException] = []
        for request in requests:
            try:
                outcomes.append(self.predictor.predict([request])[0])
            except Exception as e:
                outcomes.append(e)
        return outcomes

    async def stop(self, timeout: float) -> None:
        """Stop accepting, let queued and running requests finish (up to `timeout`), then stop."""
        self._accepting = False
        deadline = time.perf_counter() + timeout
        while self.busy and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(ShuttingDownError("the server shut down before this request ran"))
        self._pending.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)
