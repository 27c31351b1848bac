"""The demo page at `/`: served same-origin (TestClient), and driven in a real headless Chromium
(Playwright, Debian's `chromium` binary) against a real `python -m serving` process: the streamed
answer must be what the API answers for the same request, and boxes must be drawn over the image.

`python -m tests.test_demo_page BASE_URL OUT.png` drives a running server through a grounding run and
saves a screenshot (how docs/demo_page.png was made).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from serving.app import build_app
from serving.config import ServeConfig
from serving.demo import STATIC
from tests.test_serving import build_micro_checkpoint
from tests.test_serving_process import REPO, server_process

SHAPES = REPO / "examples" / "shapes.png"
CHROMIUM = next((p for name in ("chromium", "chromium-browser") if (p := shutil.which(name))), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)"
)
MAX_CHARS = 60  # the server's instruction limit here, so the page can be shown a 422
RUN_TIMEOUT_MS = 120_000  # two busy CPU cores


# ---------------------------------------------------------------------------------------------------
# Same origin, no browser needed


class Refs(HTMLParser):
    """Every src / href in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v for k, v in attrs if k in ("src", "href") and v is not None]


def test_page_and_assets_are_same_origin() -> None:
    client = TestClient(build_app(ServeConfig(checkpoint="unused")))  # no lifespan: the model never loads
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    parser = Refs()
    parser.feed(page.text)
    assets = [r for r in parser.refs if r.startswith("/static/")]
    assert {"/static/app.js", "/static/style.css"} <= set(assets)
    for ref in parser.refs:
        assert ref.startswith("/") and not ref.startswith("//") or ref.startswith("data:"), ref
    for ref in assets:
        r = client.get(ref)
        assert r.status_code == 200, ref
        assert r.headers["content-type"].split(";")[0] in ("text/javascript", "text/css")
    for path in STATIC.iterdir():
        assert not re.search(r"https?://", path.read_text()), f"{path.name} names another origin"
    missing = client.get("/static/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    assert client.get("/static/..%2Fapp.py").status_code == 404


# ---------------------------------------------------------------------------------------------------
# In a browser


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("demo")
    checkpoint = build_micro_checkpoint(root, with_vq=False)
    flags = ("--max-instruction-chars", str(MAX_CHARS))
    with server_process(checkpoint, root / "server.log", *flags) as (base, _):
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM is not None  # the tests that use it are marked needs_chromium
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser, server: str) -> Iterator[Page]:
    """The demo page with examples/shapes.png chosen; console errors (CSP refusals too) fail the test."""
    context = browser.new_context(viewport={"width": 1100, "height": 640})
    tab = context.new_page()
    errors: list[str] = []

    def console(message: ConsoleMessage) -> None:
        # The browser logs every non-2xx fetch; the error test's 422 is on purpose.
        if message.type == "error" and "responded with a status of 422" not in message.text:
            errors.append(message.text)

    tab.on("console", console)
    tab.on("pageerror", lambda e: errors.append(str(e)))
    open_page(tab, server)
    yield tab
    context.close()
    assert not errors, errors


def open_page(tab: Page, base: str) -> None:
    tab.goto(base + "/")
    expect(tab.locator("#task option[value=grounding]")).to_be_attached()
    tab.set_input_files("#file", str(SHAPES))
    expect(tab.locator("#stage")).to_be_visible()


def run_task(tab: Page, task: str, **fields: str) -> str:
    """Choose `task`, fill its fields, press Run and wait for the answer; the answer text."""
    if tab.input_value("#task") != task:  # choosing it again would redraw (and empty) its inputs
        tab.select_option("#task", task)
    for name, value in fields.items():
        tab.fill(f"#field-{name}", value)
    tab.click("#run")
    expect(tab.locator("#status")).to_have_text(re.compile(r"^(Done|Failed)"), timeout=RUN_TIMEOUT_MS)
    return tab.inner_text("#answer")


def chat(base: str, **body: Any) -> httpx.Response:
    """The chat API, not streamed, with examples/shapes.png as the user message's image."""
    image = "data:image/png;base64," + base64.b64encode(SHAPES.read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": image}}]
    if "instruction" in body:
        content.insert(0, {"type": "text", "text": body.pop("instruction")})
    request = {"model": "micro", "messages": [{"role": "user", "content": content}], **body}
    return httpx.post(base + "/v1/chat/completions", json=request, timeout=120, trust_env=False)


def drawn_boxes(tab: Page) -> list[tuple[list[float], str]]:
    """The overlay's boxes as [x0, y0, x1, y1] in image pixels, each with its label."""
    rects = tab.eval_on_selector_all(
        "#overlay rect",
        "rs => rs.map(r => ['x', 'y', 'width', 'height'].map(k => Number(r.getAttribute(k))))",
    )
    labels = tab.eval_on_selector_all("#overlay text", "ts => ts.map(t => t.textContent)")
    return [([x, y, x + w, y + h], label) for (x, y, w, h), label in zip(rects, labels, strict=True)]


@needs_chromium
def test_caption_and_grounding_stream_into_the_page(page: Page, server: str) -> None:
    answer = run_task(page, "caption")
    api = chat(server, task="caption").json()
    assert answer == api["choices"][0]["message"]["content"] == api["ofa"]["text"]
    assert page.locator("#error").is_hidden()

    answer = run_task(page, "grounding", text="the red star")
    api = chat(server, task="grounding", text="the red star").json()
    assert answer == api["choices"][0]["message"]["content"]
    endpoint = httpx.post(
        server + "/v1/grounding",
        files={"image": ("shapes.png", SHAPES.read_bytes(), "image/png")},
        data={"text": "the red star"},
        timeout=120,
        trust_env=False,
    ).json()
    assert endpoint["box"] == api["ofa"]["box"] and endpoint["text"] == answer
    [(box, label)] = drawn_boxes(page)
    assert box == pytest.approx(endpoint["box"]) and label == "the red star"
    frame, rect = (page.locator(s).bounding_box() for s in ("#picture", "#overlay rect"))
    scale = frame["width"] / endpoint["image_size"][0]  # on screen: scaled with the picture
    assert rect["x"] == pytest.approx(frame["x"] + box[0] * scale, abs=2)
    assert rect["y"] == pytest.approx(frame["y"] + box[1] * scale, abs=2)


@needs_chromium
def test_region_dragged_on_the_image_is_the_request_box(page: Page, server: str) -> None:
    page.select_option("#task", "grounded_caption")
    frame = page.locator("#overlay").bounding_box()
    page.mouse.move(frame["x"] + frame["width"] * 0.25, frame["y"] + frame["height"] * 0.25)
    page.mouse.down()
    page.mouse.move(frame["x"] + frame["width"] * 0.75, frame["y"] + frame["height"] * 0.5, steps=4)
    page.mouse.up()
    box = [float(page.input_value(f"#box-{c}")) for c in ("x0", "y0", "x1", "y1")]
    assert box == pytest.approx([32, 32, 96, 64], abs=1)  # shapes.png is 128 x 128
    answer = run_task(page, "grounded_caption")
    assert answer == chat(server, task="grounded_caption", box=box).json()["choices"][0]["message"]["content"]
    assert drawn_boxes(page) == [(pytest.approx(box), "region")]


@needs_chromium
def test_content_deltas_are_appended_as_they_come(page: Page) -> None:
    """A token-by-token stream (faked here: this server sends the content as one chunk)."""
    head = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "micro"}
    deltas = [{"role": "assistant", "content": ""}, {"content": "<bin_1> "}, {"content": "<bin_2>"}, {}]
    events = [{**head, "choices": [{"index": 0, "delta": d}]} for d in deltas]
    events[-1]["ofa"] = {"text": "<bin_1> <bin_2>", "box": [8.0, 16.0, 64.0, 96.0], "image_size": [128, 128]}
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body),
    )
    assert run_task(page, "grounding", text="the red star") == "<bin_1> <bin_2>"
    assert drawn_boxes(page) == [([8.0, 16.0, 64.0, 96.0], "the red star")]


@needs_chromium
def test_server_errors_are_shown(page: Page, server: str) -> None:
    instruction = "describe " * (MAX_CHARS // 9 + 1)
    run_task(page, "", instruction=instruction)
    api = chat(server, instruction=instruction)
    assert api.status_code == 422
    expect(page.locator("#error")).to_contain_text(api.json()["error"]["message"])
    assert page.inner_text("#answer") == ""


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """Screenshot of the page after a grounding run ("the red star") against the server at argv[0]."""
    if len(argv) != 2 or CHROMIUM is None:
        print("usage: python -m tests.test_demo_page BASE_URL OUT.png (needs chromium)", file=sys.stderr)
        return 2
    base, out = argv
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        tab = b.new_page(viewport={"width": 1100, "height": 600})
        open_page(tab, base)
        print(run_task(tab, "grounding", text="the red star"))
        tab.screenshot(path=out, full_page=True)
        b.close()
    print(f"wrote {out} ({Path(out).stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
