"""The HTML page of a real job's trace, opened in headless Chromium: what a person sees, not the string.

Needs Debian's `chromium` and `chromium-driver` (apt) and `selenium` (the dev extra); selenium is given
both paths, so it never tries to download a browser. Without them the test fails and says what to install.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image

from blockpress.runtime.contracts.settings import DenoiseSettings
from blockpress.runtime.tracing.names import Attr, SpanName
from blockpress.runtime.tracing.page import render_html
from blockpress.runtime.tracing.store import SpanRecord
from blockpress.runtime.tracing.telemetry import job_context
from blockpress.workers.types import CanvasEvent

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
BAR_BLUE = (0x4A, 0x7B, 0xD0)
ENTROPY_ORANGE = (0xE0, 0x8A, 0x1E)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    assert not missing, f"{' and '.join(missing)} missing: apt-get install -y chromium chromium-driver"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="bp-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,1400"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def agent_like_trace(tiny_checkpoint: Path) -> list[SpanRecord]:
    """Two turns of one job on the real engine, each stopped at its first canvas, as an agent does."""
    from blockpress.workers import DiffusionEngine
    from blockpress.workers.traced import TracedEngine

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    engine = TracedEngine(DiffusionEngine.from_pretrained(tiny_checkpoint), tracer=tracer)
    settings = DenoiseSettings(max_new_tokens=64, max_denoising_steps=5, seed=1, stop_token_ids=())
    session = engine.new_session()
    token = otel_context.attach(job_context(otel_context.get_current()))
    try:
        with tracer.start_as_current_span(SpanName.REPLICA_RUN, attributes={Attr.JOB_ID: "job-browser"}):
            for turn in range(2):
                with tracer.start_as_current_span(SpanName.AGENT_TURN, attributes={Attr.TURN_INDEX: turn}):
                    stream = engine.stream(f"turn {turn} of the conversation", settings, session=session)
                    next(e for e in stream if isinstance(e, CanvasEvent))
                    stream.close()
    finally:
        otel_context.detach(token)
    provider.shutdown()
    return [SpanRecord.from_span(s) for s in exporter.get_finished_spans()]


def ink(png: bytes, colour: tuple[int, int, int] | None = None) -> int:
    """Pixels of `colour` (within a small tolerance), or pixels that are not near-white."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    pixels = list(image.get_flattened_data())
    if colour is None:
        return sum(1 for p in pixels if min(p) < 200)
    return sum(1 for p in pixels if all(abs(a - b) <= 12 for a, b in zip(p, colour, strict=True)))


def test_the_page_shows_a_time_axis_span_details_canvas_indices_and_labelled_charts(
    browser, agent_like_trace, tmp_path
):
    from selenium.webdriver.common.by import By

    page = tmp_path / "trace.html"
    page.write_text(render_html(agent_like_trace), encoding="utf-8")
    browser.get(page.as_uri())
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    assert ink(shot.read_bytes(), BAR_BLUE) > 500, "span bars are drawn"

    # The time axis: tick labels in order across the waterfall, with the unit.
    waterfall = browser.find_element(By.ID, "waterfall")
    assert ink(waterfall.screenshot_as_png, BAR_BLUE) > 200
    ticks = [t for t in waterfall.find_elements(By.CSS_SELECTOR, "text.tick") if t.is_displayed()]
    assert len(ticks) >= 3
    values = [float(t.text) for t in ticks]
    xs = [t.rect["x"] for t in ticks]
    assert values[0] == 0 and values == sorted(values) and xs == sorted(xs) and xs[-1] - xs[0] > 300
    assert waterfall.find_element(By.CSS_SELECTOR, "text.axis-label").text == "ms"

    # Canvases of one job are numbered through the job: #0 and #1, in the rows and the charts.
    rows = waterfall.find_elements(By.CSS_SELECTOR, "g.span")
    labels = [r.find_element(By.TAG_NAME, "text").text.strip() for r in rows]
    assert [x for x in labels if x.startswith(SpanName.ENGINE_CANVAS)] == ["engine.canvas #0", "engine.canvas #1"]
    figures = browser.find_elements(By.CSS_SELECTOR, "figure[data-canvas]")
    assert [f.get_attribute("data-canvas") for f in figures] == ["0", "1"]

    # The detail panel: shown from the start, and a click on the second canvas shows its attributes.
    detail = browser.find_element(By.ID, "detail")
    assert detail.is_displayed() and ink(detail.screenshot_as_png) > 200
    second = rows[labels.index("engine.canvas #1")]
    second.click()
    cells = {
        r.find_elements(By.TAG_NAME, "td")[0].text: r.find_elements(By.TAG_NAME, "td")[1].text
        for r in detail.find_elements(By.TAG_NAME, "tr")
    }
    assert detail.find_element(By.TAG_NAME, "h3").text == "engine.canvas #1"
    assert cells[Attr.CANVAS_INDEX] == "1" and cells[Attr.CANVAS_GENERATION_INDEX] == "0"
    assert cells[Attr.CANVAS_MAX_STEPS] == "5" and cells["duration"].endswith(" ms")
    prefill = rows[labels.index(SpanName.ENGINE_PREFILL)]
    prefill.click()
    assert detail.find_element(By.TAG_NAME, "h3").text == SpanName.ENGINE_PREFILL
    assert Attr.GEN_AI_INPUT_TOKENS in detail.text
    assert ink(detail.screenshot_as_png) > 200

    # Each chart has both y-scales, a step axis and its labels; the caption is not cut off.
    for figure in figures:
        chart = figure.find_element(By.CSS_SELECTOR, "svg.chart")
        png = chart.screenshot_as_png
        assert ink(png, ENTROPY_ORANGE) > 20 and ink(png, BAR_BLUE) > 20, "both curves are drawn"
        acc = [float(t.text) for t in chart.find_elements(By.CSS_SELECTOR, "text.y-acc")]
        assert acc[0] == 0 and acc[-1] > 0
        assert len(chart.find_elements(By.CSS_SELECTOR, "text.y-ent")) == 3
        assert chart.find_element(By.CSS_SELECTOR, "text.x-label").text == "step"
        assert "accepted" in chart.find_element(By.CSS_SELECTOR, "text.y-label").text
        assert "entropy" in chart.find_element(By.CSS_SELECTOR, "text.y2-label").text
        caption = figure.find_element(By.TAG_NAME, "figcaption")
        assert caption.text.startswith("canvas #") and caption.text.endswith("tokens")
        fits = browser.execute_script("return arguments[0].scrollWidth <= arguments[0].clientWidth", caption)
        assert fits, "the caption is shown whole"
