"""The engine: a bounded queue, dynamic batching and one worker thread that runs the model.

Continuous batching (`continuous_batching`, the default): the worker decodes a step at a time
(`Predictor.stepwise`), and between steps queued requests join the running ones, up to
`max_batch_size` requests, and finished ones are answered, so a short request does not wait for a
long one's batch to end. Each request gets the tokens it would get alone. When nothing runs, the first
request waits `batch_window_ms` for company, as below. A request that fails to start fails alone;
an error in a shared decoding step fails the requests in it.

Without it, requests that arrive within `batch_window_ms` of the first waiting one (up to
`max_batch_size`) run as one `Predictor.predict` call, which already groups requests with equal
decoding settings into one generate call, and the batch runs to its end; requests that arrive
meanwhile form the next batch. A batch that raises is retried one request at a time, so one bad
request fails alone (a request that has already streamed tokens fails instead: a retry would send
them again).

Either way the model runs on a single worker thread, so the event loop keeps accepting, queueing and
answering (health, metrics, 503s) while it decodes. A request that times out or whose client goes
away leaves the queue; if it is already decoding, its row leaves the batch at the next decoding step.

Streaming (`stream`): the request queues, batches and times out like any other; the worker thread
hands each decoded token to the event loop as it is chosen, and the caller iterates them.

Jobs (`call`: embeddings, retrieval) take the same queue, limits and worker thread, one job per
turn in arrival order, so the model is never run from two threads. A job that times out stops being
waited for; once it has started on the worker it runs to its end (it cannot be interrupted).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

from ofa_unified.inference import Request
from serving.config import ServeConfig
from serving.telemetry import ServeMetrics

logger = logging.getLogger("serving.engine")
T = TypeVar("T")
# Continuous batching admits queued requests once they number a quarter of the running ones (or fill
# the free slots), or after this many steps of waiting: each admission copies the running rows'
# caches (`KVCache.concat`) and encodes the newcomers, so one per step would cost more than the
# batching gains (bench/README.md, "Continuous batching"), while a few steps' wait is short.
JOIN_FRACTION = 0.25
JOIN_MAX_STEPS = 8


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
    has_retrieval: bool

    def predict(self, requests: list[Request]) -> list[dict]: ...

    def stepwise(self) -> Any: ...  # an ofa_unified.inference.StepwiseSession

    def embed_images(self, images: list[Any]) -> Any: ...

    def embed_texts(self, texts: list[str]) -> Any: ...

    def rank(self, query: Any, candidates: list[Any], rerank: int = 0) -> list[dict]: ...


class EngineClient(Protocol):
    """The interface handlers program against (the batching engine, or a stand-in)."""

    predictor: PredictorLike

    @property
    def queue_depth(self) -> int: ...

    async def generate(self, request: Request, timeout: float) -> dict: ...

    def stream(self, request: Request, timeout: float) -> EngineStream: ...

    async def call(self, job: Callable[[], T], timeout: float) -> T: ...


class Progress(NamedTuple):
    """A streaming request's step: the new token ids and the answer's text so far."""

    tokens: list[int]
    text: str


class _Listener:
    """The engine's `TokenListener` for one request. `tokens` runs on the worker thread and posts
    progress to the event loop (streaming requests only); the event loop sets `cancelled`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue | None) -> None:
        self.cancelled = False
        self.streaming = queue is not None
        self.delivered = 0  # tokens handed to the event loop
        self._loop, self._queue = loop, queue

    def tokens(self, ids: list[int], text: str) -> None:
        if self._queue is None or self.cancelled:
            return
        self.delivered += len(ids)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody reads them
            self._loop.call_soon_threadsafe(self._queue.put_nowait, Progress(list(ids), text))


_END = object()  # a stream's last event: its future is done


@dataclass(eq=False)
class _Item:
    request: Request | None  # None for a job
    future: asyncio.Future
    listener: _Listener
    events: asyncio.Queue | None = None  # Progress events, then _END (streaming requests)
    enqueued: float = field(default_factory=time.perf_counter)
    job: Callable[[], Any] | None = None  # run alone on the worker thread instead of a request


class EngineStream:
    """A streaming request: `async for progress in stream` yields a `Progress` per decoding step as
    the model writes (none for beam search, whose answer is known at its end); when the iteration ends,
    `result` holds the predictor's result, or the iteration raised what `generate` would. The
    deadline counts from when the request was queued, as `generate`'s timeout does. `close()` when
    the reader goes away: the request leaves the queue, or its row the running batch."""

    def __init__(self, engine: BatchingEngine, item: _Item, timeout: float) -> None:
        self._engine, self._item, self._timeout = engine, item, timeout
        self._deadline = item.enqueued + timeout
        self.result: dict | None = None

    def __aiter__(self) -> EngineStream:
        return self

    async def __anext__(self) -> Progress:
        events = self._item.events
        assert events is not None
        if events.empty():
            try:
                event = await asyncio.wait_for(events.get(), max(0.0, self._deadline - time.perf_counter()))
            except asyncio.TimeoutError:
                self.close()
                raise EngineTimeoutError(f"no result within {self._timeout:g} s") from None
        else:
            event = events.get_nowait()
        if event is _END:
            events.put_nowait(_END)  # a later call ends the same way
            self.result = self._item.future.result()
            raise StopAsyncIteration
        return event

    def close(self) -> None:
        self._engine._give_up(self._item)


class BatchingEngine:
    """Dynamic batching over a `Predictor`; start() inside a running event loop, stop() to drain."""

    def __init__(self, predictor: PredictorLike, config: ServeConfig, metrics: ServeMetrics) -> None:
        self.predictor = predictor
        self.max_batch_size = config.max_batch_size
        self.window = config.batch_window_ms / 1000.0
        self.max_queue_depth = config.max_queue_depth
        self.continuous = config.continuous_batching
        self.metrics = metrics
        self._pending: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ofa-engine")
        self._task: asyncio.Task | None = None
        self._running = 0  # requests (or a job) now on the worker thread
        self._accepting = False

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        return bool(self._pending) or self._running > 0

    async def start(self) -> None:
        loop = self._step_loop() if self.continuous else self._batch_loop()
        self._task = asyncio.get_running_loop().create_task(loop, name="ofa-batcher")
        self._accepting = True

    async def warmup(self, request: Request) -> dict:
        """Run one request straight on the worker thread (no queue limits): loads kernels, fills caches."""
        loop = asyncio.get_running_loop()
        return (await loop.run_in_executor(self._executor, self.predictor.predict, [request]))[0]

    async def generate(self, request: Request, timeout: float) -> dict:
        """Queue one request and wait for its result; raises EngineError subclasses or the
        exception the predictor raised for this request (ValueError for bad input)."""
        return await self._wait(self._enqueue(request, streaming=False), timeout)

    async def call(self, job: Callable[[], T], timeout: float) -> T:
        """Queue `job` (model work that is not a generate request: embeddings, retrieval) to run
        alone on the worker thread; its return value, or what it raised, with generate's refusals."""
        return await self._wait(self._enqueue(None, streaming=False, job=job), timeout)

    async def _wait(self, item: _Item, timeout: float) -> Any:
        try:
            return await asyncio.wait_for(item.future, timeout)
        except asyncio.TimeoutError:
            raise EngineTimeoutError(f"no result within {timeout:g} s") from None
        finally:
            self._give_up(item)  # timed out or the client went away (a no-op once answered)

    def stream(self, request: Request, timeout: float) -> EngineStream:
        """Queue one request whose tokens are wanted as they are decoded. Refusals (shutting down,
        queue full) raise here; the rest comes from iterating the stream."""
        return EngineStream(self, self._enqueue(request, streaming=True), timeout)

    def _enqueue(
        self, request: Request | None, streaming: bool, job: Callable[[], Any] | None = None
    ) -> _Item:
        if not self._accepting:
            raise ShuttingDownError("the server is shutting down")
        if len(self._pending) >= self.max_queue_depth:
            raise QueueFullError(f"{len(self._pending)} requests are already waiting")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue | None = asyncio.Queue() if streaming else None
        listener = _Listener(loop, events)
        request = None if request is None else dataclasses.replace(request, listener=listener)
        item = _Item(request, loop.create_future(), listener, events, job=job)
        if events is not None:
            # Done callbacks run after the tokens the worker posted before finishing: _END comes last.
            item.future.add_done_callback(lambda _: events.put_nowait(_END))
        self._pending.append(item)
        self.metrics.queue_depth.set(len(self._pending))
        self._wakeup.set()
        return item

    def _give_up(self, item: _Item) -> None:
        """The caller stopped waiting: leave the queue, or have the worker drop the request's row."""
        if item.future.done():
            return
        item.future.cancel()
        item.listener.cancelled = True
        if item in self._pending:
            self._pending.remove(item)
            self.metrics.queue_depth.set(len(self._pending))
            self.metrics.cancelled.labels("queued").inc()

    async def _wait_for_work(self) -> None:
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _wait_for_company(self) -> None:
        """Give the first waiting request `batch_window_ms` to be joined by others (not a job)."""
        if self.window > 0 and len(self._pending) < self.max_batch_size and self._pending[0].job is None:
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

    async def _batch_loop(self) -> None:
        while True:
            await self._wait_for_work()
            await self._wait_for_company()
            batch = self._take()
            self.metrics.queue_depth.set(len(self._pending))
            batch = [item for item in batch if not item.future.done()]
            try:
                if batch and batch[0].job is not None:
                    await self._run_job(batch[0])
                elif batch:
                    await self._run(batch)
            except Exception as e:  # keep the loop alive whatever happens to one batch
                logger.exception("batch failed")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)

    def _take(self, limit: int | None = None) -> list[_Item]:
        """The next turn: a job alone, or up to `limit` (max_batch_size) requests, stopping at a job."""
        limit = self.max_batch_size if limit is None else limit
        if self._pending and self._pending[0].job is not None:
            return [self._pending.popleft()]
        batch: list[_Item] = []
        while self._pending and len(batch) < limit and self._pending[0].job is None:
            batch.append(self._pending.popleft())
        return batch

    async def _step_loop(self) -> None:
        """Continuous batching: each turn on the worker thread starts the requests that join (up to
        max_batch_size running) and runs one decoding step; finished requests are answered between
        turns. A job at the head of the queue runs alone between two steps."""
        loop = asyncio.get_running_loop()
        session = self.predictor.stepwise()
        waited = 0  # steps run while requests were queued and none joined
        while True:
            if not len(session):
                await self._wait_for_work()
                await self._wait_for_company()
            if self._pending and self._pending[0].job is not None:
                job = self._pending.popleft()
                self.metrics.queue_depth.set(len(self._pending))
                if not job.future.done():
                    await self._run_job(job)
                continue
            free = self.max_batch_size - len(session)
            enough = min(free, math.ceil(JOIN_FRACTION * len(session)))
            if len(self._pending) >= enough or waited >= JOIN_MAX_STEPS:
                joining, waited = self._take(free), 0
            else:
                joining, waited = [], waited + 1 if self._pending else 0
            self.metrics.queue_depth.set(len(self._pending))
            joining = [item for item in joining if not item.future.done()]
            start = time.perf_counter()
            for item in joining:
                self.metrics.queue_wait.observe(start - item.enqueued)
            if joining:
                self.metrics.batch_size.observe(len(session) + len(joining))
            self._running = len(session) + len(joining)
            self.metrics.running.set(self._running)
            try:
                outcomes = await loop.run_in_executor(self._executor, self._turn, session, joining)
            except Exception as e:  # the executor itself failed (e.g. shut down)
                logger.exception("decoding step failed")
                outcomes = [(item, e) for item in joining]
            finally:
                self._running = len(session)
                self.metrics.running.set(self._running)
            self.metrics.batch_latency.observe(time.perf_counter() - start)
            for item, outcome in outcomes:
                self._deliver(item, outcome)

    @staticmethod
    def _turn(session: Any, joining: list[_Item]) -> list[tuple[_Item, dict | BaseException]]:
        """Runs on the worker thread: start `joining`, then one step of everything running."""
        outcomes = session.add([(item, item.request) for item in joining])
        if len(session):
            outcomes += session.step()
        return outcomes

    async def _run_job(self, item: _Item) -> None:
        assert item.job is not None
        loop = asyncio.get_running_loop()
        self.metrics.queue_wait.observe(time.perf_counter() - item.enqueued)
        self._running += 1  # a step-wise batch may be waiting on the worker too
        self.metrics.running.set(self._running)
        try:
            result = await loop.run_in_executor(self._executor, item.job)
        except Exception as e:
            if not item.future.done():
                item.future.set_exception(e)
            return
        finally:
            self._running -= 1
            self.metrics.running.set(self._running)
        if not item.future.done():
            item.future.set_result(result)

    async def _run(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        for item in batch:
            self.metrics.queue_wait.observe(start - item.enqueued)
        self.metrics.batch_size.observe(len(batch))
        self._running = len(batch)
        self.metrics.running.set(len(batch))
        try:
            outcomes = await loop.run_in_executor(self._executor, self._predict_isolated, batch)
        except Exception as e:  # the executor itself failed (e.g. shut down): fail the whole batch
            outcomes = [e] * len(batch)
        finally:
            self._running = 0
            self.metrics.running.set(0)
        self.metrics.batch_latency.observe(time.perf_counter() - start)
        logger.debug("ran batch", extra={"batch_size": len(batch), "seconds": time.perf_counter() - start})
        for item, outcome in zip(batch, outcomes, strict=True):
            self._deliver(item, outcome)

    def _deliver(self, item: _Item, outcome: dict | BaseException) -> None:
        if isinstance(outcome, BaseException):
            if not item.future.done():
                item.future.set_exception(outcome)
            return
        if outcome.get("cancelled"):  # its row left the batch: nobody waits for it
            self.metrics.cancelled.labels("decoding").inc()
            return
        assert item.request is not None
        task = item.request.task or "free"
        self.metrics.generated_tokens.labels(task).inc(len(outcome.get("tokens", ())))
        if not item.future.done():
            item.future.set_result(outcome)

    def _predict_isolated(self, batch: list[_Item]) -> list[dict | BaseException]:
        """Runs on the worker thread. A failing batch is retried request by request, so the error
        lands on the request that caused it; one that has streamed tokens keeps the batch's error."""
        try:
            return list(self.predictor.predict([item.request for item in batch]))
        except Exception as e:
            if len(batch) == 1:
                return [e]
            error = e
        outcomes: list[dict | BaseException] = []
        for item in batch:
            if item.listener.delivered:
                outcomes.append(error)
                continue
            try:
                outcomes.append(self.predictor.predict([item.request])[0])
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
