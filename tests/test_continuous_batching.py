"""Continuous batching: decodings that join a running `StepwiseBatch` between steps, next to rows at
other positions, and leave when they finish (or are cancelled) get exactly the tokens they get
decoded alone; the predictor's `StepwiseSession` and the engine built on it answer a short request
while a long one is still decoding."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from ofa_unified.generate import Decoding, GenerationConfig, StepwiseBatch, generate
from ofa_unified.inference import Predictor, Request
from serving.config import ServeConfig
from serving.engine import BatchingEngine
from serving.telemetry import ServeMetrics
from tests.test_decode_reference import PREFIX, cases, constraints_of, encoder_output, model_of
from tests.test_serving import build_micro_checkpoint, encode, scene

TEXT_CASES = {name: case for name, case in sorted(cases().items()) if "code_mask" not in case}


def _inputs(case: dict, models: dict):
    model = models.setdefault(case["model"], model_of(case["model"]))
    enc = encoder_output(model, None)
    prefix = PREFIX if case.get("prefix") else None
    return model, enc, GenerationConfig(**case["config"]), constraints_of(case.get("constraints")), prefix


def _run_staggered(model, decodings: list[Decoding], join_at: list[int], cancel: dict[int, int]) -> None:
    """Decodings join at their steps; `cancel`: decoding index -> step at which its sample 0 goes."""
    batch, step, waiting = StepwiseBatch(model), 0, list(range(len(decodings)))
    while waiting or len(batch):
        batch.join([decodings[i] for i in waiting if join_at[i] <= step])
        waiting = [i for i in waiting if join_at[i] > step]
        if len(batch):
            batch.choose()
            for i, at in cancel.items():
                if at == step:
                    decodings[i].cancel([0])
            batch.advance()
        step += 1


def test_joining_and_leaving_rows_decode_as_they_do_alone() -> None:
    """Every text case of the decode fixture (greedy, beams, seeded sampling, tries, min_new_tokens,
    n-gram blocking, ragged prefixes), its model's cases in one batch, joining two steps apart, one of
    them cancelled mid-way: the same tokens as alone, scores to float rounding."""
    models: dict = {}
    by_model: dict[str, list[str]] = {}
    for name, case in TEXT_CASES.items():
        by_model.setdefault(case["model"], []).append(name)
    for names in by_model.values():
        inputs = [_inputs(TEXT_CASES[n], models) for n in names]
        with torch.inference_mode():
            alone = [generate(*args) for args in inputs]
            decodings = [Decoding(*args) for args in inputs]
            _run_staggered(inputs[0][0], decodings, [2 * i for i in range(len(names))], {1: 3})
            for i, (name, want, got) in enumerate(zip(names, alone, decodings, strict=True)):
                assert got.results is not None, name
                if i == 1:  # cancelled: sample 0 has no result, the others are untouched
                    assert got.results[0] == []
                    want, have = want[1:], got.results[1:]
                else:
                    have = got.results
                assert [[h.tokens for h in hs] for hs in have] == [[h.tokens for h in hs] for hs in want], (
                    name
                )
                for hs, ws in zip(have, want, strict=True):
                    for h, w in zip(hs, ws, strict=True):
                        assert h.score == pytest.approx(w.score, rel=1e-5, abs=1e-5), name


def test_image_code_outputs_do_not_join() -> None:
    model = model_of("ofa")
    enc = encoder_output(model, [True, False, False, False])
    with pytest.raises(ValueError, match="image-code"):
        StepwiseBatch(model).join([Decoding(model, enc, GenerationConfig(max_new_tokens=4))])


# ---------------------------------------------------------------------------------------------------
# The predictor's session and the engine


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return Predictor.from_checkpoint(build_micro_checkpoint(tmp_path_factory.mktemp("continuous")))


class _Tokens:
    """A streaming listener that keeps what it is sent."""

    def __init__(self) -> None:
        self.cancelled, self.streaming, self.ids = False, True, []

    def tokens(self, ids: list[int], text: str) -> None:
        self.ids += ids


def _same(got, want) -> bool:
    """Equal results: floats (scores, probabilities) to float32 rounding, everything else exactly."""
    if isinstance(want, float):
        return got == pytest.approx(want, rel=1e-5, abs=1e-6)
    if isinstance(want, dict):
        return (
            isinstance(got, dict) and got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
        )
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_same, got, want))
    return got == want


def _requests() -> list[Request]:
    image = scene()
    long = {"beam_size": 1, "max_new_tokens": 40, "min_new_tokens": 40}
    return [
        Request(image, instruction="what does the image describe?", options=long),
        Request(image, "vqa", {"question": "what color is the shape?"}),
        Request(image, "itm", {"text": "a red circle"}),
        Request(image, instruction="describe", options={"do_sample": True, "seed": 7, "max_new_tokens": 20}),
        Request(image, "caption", options={"beam_size": 3}),
        Request(image, "grounding", {"text": "the shape"}, options={"beam_size": 1}),
    ]


def test_session_results_equal_predict_alone(predictor: Predictor) -> None:
    """Requests joining a running session at different steps, one streaming: each result is
    `predict`'s for that request alone, the streamed tokens are its tokens, and a short request is
    answered while the long one still decodes."""
    requests = _requests()
    alone = [predictor.predict([r])[0] for r in requests]
    listener = _Tokens()
    requests[0].listener = listener
    session = predictor.stepwise()
    join_at = {0: [0], 2: [1, 2], 5: [3, 4, 5]}
    out: dict[int, dict] = {}
    order: list[int] = []
    step = 0
    while step <= max(join_at) or len(session):
        joining = [(i, requests[i]) for i in join_at.get(step, [])]
        for i, result in [*session.add(joining), *session.step()]:
            assert not isinstance(result, Exception), result
            out[i] = result
            order.append(i)
        step += 1
    assert _same([out[i] for i in range(len(requests))], alone)
    assert listener.ids == alone[0]["tokens"] and len(listener.ids) == 40
    assert order[-1] == 0  # the first and longest request finished last


def test_session_isolates_a_bad_request(predictor: Predictor) -> None:
    session = predictor.stepwise()
    good, bad = _requests()[2], Request(None, "itm", {"text": "no image"})
    outcomes = dict(session.add([("good", good), ("bad", bad)]))
    assert isinstance(outcomes.pop("bad"), ValueError) and not outcomes
    while len(session):
        outcomes.update(session.step())
    assert _same(outcomes["good"], predictor.predict([good])[0])


def test_engine_answers_a_short_request_while_a_long_one_decodes(predictor: Predictor) -> None:
    """A long request decodes; a short one queued after its start is answered before it ends, with
    the tokens it gets alone. A stream closed mid-way leaves the batch; the engine then drains."""
    long = Request(
        scene(),
        instruction="describe",
        options={"beam_size": 1, "max_new_tokens": 200, "min_new_tokens": 200},
    )
    short = _requests()[1]
    metrics = ServeMetrics()

    async def scenario():
        engine = BatchingEngine(predictor, ServeConfig(max_batch_size=4, batch_window_ms=0), metrics)
        await engine.start()
        stream = engine.stream(long, 60)
        first = await anext(stream)  # the long request is decoding
        plain_long = asyncio.ensure_future(engine.generate(long, 60))
        answer = await engine.generate(short, 60)
        long_done_first = plain_long.done()
        stream.close()
        long_answer = await plain_long
        start = time.perf_counter()
        while engine.busy:
            await asyncio.sleep(0.01)
        await engine.stop(timeout=5)
        return first, answer, long_done_first, long_answer, time.perf_counter() - start

    first, answer, long_done_first, long_answer, _ = asyncio.run(scenario())
    assert _same(answer, predictor.predict([short])[0]) and not long_done_first
    assert len(long_answer["tokens"]) == 200 and long_answer["tokens"][:1] == first.tokens
    samples = {
        s.name: s for f in metrics.registry.collect() for s in f.samples if not s.name.endswith("_created")
    }
    assert samples["ofa_cancelled_requests_total"].value == 1  # the closed stream
    assert samples["ofa_running_requests"].value == 0


def test_engine_runs_a_job_between_steps(predictor: Predictor, tmp_path: Path) -> None:
    image = Image.open(io.BytesIO(encode(scene())))
    long = Request(
        image, instruction="describe", options={"beam_size": 1, "max_new_tokens": 100, "min_new_tokens": 100}
    )

    async def scenario():
        engine = BatchingEngine(predictor, ServeConfig(batch_window_ms=0), ServeMetrics())
        await engine.start()
        running = asyncio.ensure_future(engine.generate(long, 60))
        await asyncio.sleep(0.05)
        value = await engine.call(lambda: "job", 60)
        job_first = not running.done()
        await running
        await engine.stop(timeout=5)
        return value, job_first

    assert asyncio.run(scenario()) == ("job", True)
