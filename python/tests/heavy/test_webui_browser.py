"""examples/qwen_tts_webui.py as a person sees it: Debian's Chromium, driven by Playwright, under the shim.

The server runs in this (shimmed) process, so a test can change the host budget under it; the
browser and Playwright's driver run without the shim. Screenshots of the states go to docs/images/.
Nothing here downloads a browser: Playwright is pointed at /usr/bin/chromium (apt's chromium).
"""

import contextlib
import os
import re
import socket
import wave

import pytest
from playwright.sync_api import expect

import qvshim
import qwen_tts_webui
from conftest import REPO_DIR

pytestmark = pytest.mark.heavy
CHROMIUM = "/usr/bin/chromium"
IMAGES_DIR = os.path.join(REPO_DIR, "docs", "images")
MAX_NEW_TOKENS = 8  # random weights rarely say "stop": cap the codec tokens per line
PAGE_WAIT_MS = 120_000  # generous bound for the page and for a line on a busy 2-core machine; never a speed test
LINE_TOO_BIG_REPEATS = 30_000  # "Hello world. " this many times asks torch for a ~500 MiB block at once
LINE_TOO_BIG_ROOM = 400 << 20  # the budget is set this far above what the server holds before that line
VIEWPORT = {"width": 1280, "height": 900}
SUBSETS = [  # every non-empty subset of the three model directories, and the tab the page must open on
    (("custom_voice",), "Custom voice"),
    (("voice_clone",), "Voice clone"),
    (("voice_design",), "Voice design"),
    (("custom_voice", "voice_clone"), "Custom voice"),
    (("custom_voice", "voice_design"), "Custom voice"),
    (("voice_clone", "voice_design"), "Voice clone"),
    (("custom_voice", "voice_clone", "voice_design"), "Custom voice"),
]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def without_shim_in_environ():
    """Playwright starts its driver from os.environ: keep the shim out of it (and of the browser)."""
    saved = {name: os.environ.pop(name) for name in ("LD_PRELOAD", "PYTHONMALLOC") if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: apt-get install chromium (see .ci/run)"
    with without_shim_in_environ():
        playwright = sync_playwright().start()
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    yield launched
    launched.close()
    playwright.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    context.set_default_timeout(PAGE_WAIT_MS)
    expect.set_options(timeout=PAGE_WAIT_MS)
    opened = context.new_page()
    yield opened
    context.close()


@contextlib.contextmanager
def served(model_dirs, out_dir, **app_options):
    """The web UI over these model directories, in this process; yields (url, app)."""
    qvshim.events.clear()  # the feed is the process's: start each page without earlier tests' lines
    app = qwen_tts_webui.TTSApp(model_dirs, out_dir=str(out_dir), generate_kwargs={"max_new_tokens": MAX_NEW_TOKENS},
                                **app_options)
    ui = qwen_tts_webui.build_ui(app)
    port = free_port()
    ui.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", app
    finally:
        ui.close()
        app.close()


def screenshot(page, name):
    os.makedirs(IMAGES_DIR, exist_ok=True)
    page.screenshot(path=os.path.join(IMAGES_DIR, name), full_page=True)


def open_page(page, url):
    """Open the page and wait until its load event has run (the memory panel is filled by it)."""
    page.goto(url)
    page.get_by_role("tab").first.wait_for()
    page.locator("#memory-pools table").wait_for()


def type_into(box, text):
    """Fill a text box and leave it, so Gradio holds the new value before a button is clicked."""
    box.fill(text)
    box.blur()
    expect(box).to_have_value(text)


def visible_tab_panel(page):
    """The selected tab's panel, which must be visible and hold a usable text box."""
    panel = page.locator("[role=tabpanel]:visible").first
    panel.wait_for()
    return panel


# Gradio's player keeps its <audio> inside a shadow root: walk them all.
AUDIO_DURATION_JS = """el => {
    const found = [];
    const walk = node => node.querySelectorAll('*').forEach(child => {
        if (child.tagName === 'AUDIO') found.push(child);
        if (child.shadowRoot) walk(child.shadowRoot);
    });
    walk(el);
    return Math.max(0, ...found.filter(a => a.src).map(a => a.duration || 0));
}"""


UNLIMITED_BYTES = 2**64 - 1


def wait_for_audio(page, scope):
    """The duration in seconds of the audio that appears in scope (an <audio> with a source)."""
    try:
        page.wait_for_function(f"el => ({AUDIO_DURATION_JS})(el) > 0", arg=scope.element_handle(),
                               timeout=PAGE_WAIT_MS)
    except Exception:
        raise AssertionError(f"no audio with a duration appeared; the block holds: {scope.inner_text()[:500]}")
    return scope.evaluate(AUDIO_DURATION_JS)


def memory_panel_shows(page, text):
    expect(page.locator("#memory-events"), f"the memory panel must show {text!r}").to_contain_text(text)


@pytest.mark.parametrize("modes, first_tab", SUBSETS, ids=["+".join(modes) for modes, _ in SUBSETS])
def test_page_opens_on_a_visible_usable_tab(page, tiny_models, tmp_path, modes, first_tab):
    with served({mode: tiny_models[mode] for mode in modes}, tmp_path / "out") as (url, app):
        open_page(page, url)
        tabs = [name.strip() for name in page.get_by_role("tab").all_inner_texts()]
        expected = [qwen_tts_webui.MODES[m][0] for m in qwen_tts_webui.MODES if m in modes] + ["Batch"]
        assert tabs == expected, f"tabs shown: {tabs}, expected one per model given and Batch: {expected}"
        selected = page.get_by_role("tab", selected=True).inner_text().strip()
        assert selected == first_tab, f"the page opened on {selected!r}, expected {first_tab!r}"
        panel = visible_tab_panel(page)
        expect(panel.get_by_label("Text").first, "the open tab must have a visible Text box").to_be_visible()
        expect(panel.get_by_label("Text").first, "the open tab's Text box must take input").to_be_editable()
        expect(panel.get_by_role("button", name="Speak", exact=True), "the open tab must have its Speak button") \
            .to_be_enabled()
        expect(page.locator("#memory-pools table"), "the memory panel must show the host pool").to_contain_text("host")
        if modes == ("voice_clone",):
            screenshot(page, "webui-open-base-only.png")


def test_voice_clone_line_gives_audio(page, tiny_models, tmp_path):
    reference = tmp_path / "reference.wav"
    import numpy

    with qvshim.WavWriter(reference) as wav:
        wav.write((numpy.sin(numpy.arange(24000) * 0.05) * 8000).astype(numpy.int16))
    with served(tiny_models, tmp_path / "out") as (url, app):
        open_page(page, url)
        page.get_by_role("tab", name="Voice clone").click()
        panel = visible_tab_panel(page)
        type_into(panel.get_by_label("Text").first, "Hello there, this is a cloned voice.")
        panel.locator("input[type=file]").first.set_input_files(str(reference))
        type_into(panel.get_by_label("What the reference says"), "This is the reference.")
        panel.get_by_role("button", name="Speak", exact=True).click()
        speech = page.locator("#voice-clone-speech")
        duration = wait_for_audio(page, speech)
        assert duration > 0, "the Speech player must hold audio with a duration"
        memory_panel_shows(page, "model Voice clone loaded")
        screenshot(page, "webui-voice-clone.png")


def test_batch_shows_progress_and_writes_every_line(page, tiny_models, tmp_path):
    lines = [f"Line number {n}, spoken in a batch." for n in range(1, 9)]
    with served({"custom_voice": tiny_models["custom_voice"]}, tmp_path / "out", batch_size=1) as (url, app):
        open_page(page, url)
        page.get_by_role("tab", name="Batch").click()
        panel = visible_tab_panel(page)
        type_into(panel.get_by_label("Lines (one per line)"), "\n".join(lines))
        panel.get_by_role("button", name="Speak all").click()
        progress = page.get_by_text(re.compile(r"line [1-7] of 8 written"))
        progress.first.wait_for()
        screenshot(page, "webui-batch-midway.png")
        status = page.locator("#batch-status textarea")
        expect(status, "the status must say the batch is done").to_have_value(re.compile(r"^8 lines, "))
        memory_panel_shows(page, "model Custom voice loaded")
        screenshot(page, "webui-batch-done.png")
    run_dirs = list((tmp_path / "out").iterdir())
    assert len(run_dirs) == 1, f"one run directory expected under the output folder: {run_dirs}"
    written = sorted(path.name for path in run_dirs[0].iterdir())
    assert written == [f"{n:05d}.wav" for n in range(8)] + ["all.wav"], f"files written: {written}"
    for name in written:
        with wave.open(str(run_dirs[0] / name), "rb") as wav:
            assert wav.getnframes() > 0, f"{name} holds no audio"


def test_line_too_big_for_the_budget_is_a_clean_error_and_the_next_line_speaks(page, tiny_models, tmp_path):
    budget_before = qvshim.stats()[0]["budget"]
    with served({"custom_voice": tiny_models["custom_voice"]}, tmp_path / "out") as (url, app):
        open_page(page, url)
        panel = visible_tab_panel(page)
        text = panel.get_by_label("Text").first
        speak = panel.get_by_role("button", name="Speak", exact=True)
        speech = page.locator("#custom-voice-speech")
        type_into(text, "Hello.")
        speak.click()  # the model loads and torch warms up under the full budget
        wait_for_audio(page, speech)
        try:
            qvshim.set_budget(qvshim.POOL_HOST, qvshim.stats()[0]["live"] + LINE_TOO_BIG_ROOM)
            type_into(text, "Hello world. " * LINE_TOO_BIG_REPEATS)
            speak.click()
            expect(page.get_by_text("this line could not fit in memory").first,
                   "the UI must say the line did not fit").to_be_visible()
            memory_panel_shows(page, "could not fit")
            memory_panel_shows(page, "the shim refused")
            screenshot(page, "webui-line-too-big.png")
            # The refused line left "Error" in the Speech block; the tiny random model says the
            # same audio for any text, so the next line's success is the error giving way to audio.
            expect(speech, "the refused line must leave its error in the Speech block").to_contain_text("Error")
            type_into(text, "Hello again, a short line.")
            speak.click()
            try:
                page.wait_for_function(
                    f"el => !el.innerText.includes('Error') && ({AUDIO_DURATION_JS})(el) > 0",
                    arg=speech.element_handle())
            except Exception:
                raise AssertionError(f"the line after the refused one gave no audio: {speech.inner_text()[:300]!r}")
        finally:
            qvshim.set_budget(qvshim.POOL_HOST, None if budget_before >= UNLIMITED_BYTES else budget_before)
        assert speech.evaluate(AUDIO_DURATION_JS) > 0, "the line after the refused one must be spoken"
