"""examples/qwen_tts_webui.py on tiny random Qwen3-TTS checkpoints, under the shim."""

import os
import signal
import socket
import subprocess
import sys
import time
import wave

import numpy
import pytest

import qvshim
import qwen_tts_webui
from conftest import REPO_DIR

pytestmark = pytest.mark.heavy
MAX_NEW_TOKENS = 8  # random weights rarely say "stop": cap the codec tokens per line
REFERENCE = (24000, (numpy.sin(numpy.arange(24000) * 0.05) * 8000).astype(numpy.int16))


@pytest.fixture
def app(tiny_models, tmp_path):
    made = qwen_tts_webui.TTSApp(tiny_models, out_dir=str(tmp_path / "out"),
                                 generate_kwargs={"max_new_tokens": MAX_NEW_TOKENS})
    yield made
    made.close()


def test_runs_under_the_shim():
    assert qvshim.is_loaded(), "run the heavy tier with `python -m qvshim run -m pytest python/tests/heavy`"


@pytest.mark.parametrize(
    "mode, options",
    [
        ("custom_voice", {"speaker": "Vivian"}),
        ("custom_voice", {"speaker": "Ryan", "instruct": "Cheerful."}),
        ("voice_design", {"instruct": "A calm, low voice."}),
        ("voice_clone", {"ref_audio": REFERENCE, "ref_text": "This is the reference."}),
        ("voice_clone", {"ref_audio": REFERENCE, "x_vector_only": True}),
    ],
)
def test_each_mode_speaks(app, mode, options):
    rate, samples = app.speak(mode, "Hello world, this is a test.", "English", **options)
    assert rate == 24000
    assert samples.ndim == 1 and samples.size > 0 and numpy.isfinite(samples).all()


def test_models_load_on_first_use_only(app):
    assert app.models.loaded() == []
    app.speak("voice_design", "Hello.", "Auto", instruct="calm")
    assert app.models.loaded() == ["voice_design"]


def test_model_type_must_match_the_mode(tiny_models):
    with pytest.raises(ValueError, match="holds a 'voice_design' model"):
        qwen_tts_webui.TTSApp({"custom_voice": tiny_models["voice_design"]})


def test_idle_model_leaves_and_its_memory_returns(tiny_models, tmp_path):
    app = qwen_tts_webui.TTSApp(tiny_models, keep_alive=0.5, generate_kwargs={"max_new_tokens": MAX_NEW_TOKENS})
    try:
        app.speak("custom_voice", "Hello.", "Auto", speaker="Vivian")  # torch is imported and warm now
        deadline = time.monotonic() + 30
        while app.models.loaded() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.models.loaded() == []
        before = qvshim.stats()[0]["live"]
        app.speak("custom_voice", "Hello.", "Auto", speaker="Vivian")
        loaded = qvshim.stats()[0]["live"]
        while app.models.loaded() and time.monotonic() < deadline + 30:
            time.sleep(0.05)
        assert app.models.loaded() == []
        after = qvshim.stats()[0]["live"]
    finally:
        app.close()
    assert loaded > before, "loading the model must show in the host pool"
    assert after < loaded - (loaded - before) // 2, "unloading must give most of it back"


def test_batch_writes_every_line_and_the_joined_file(app):
    written = []
    lines = [f"Line number {n}." for n in range(7)] + ["", "   "]
    joined, summary = app.batch("custom_voice", lines, "English", speaker="Ryan",
                                on_written=lambda index, path, seconds: written.append(path))
    assert summary.lines == 7 and len(written) == 7
    total = 0
    for path in written:
        with wave.open(path, "rb") as wav:
            assert wav.getframerate() == 24000 and wav.getnframes() > 0
            total += wav.getnframes()
    with wave.open(joined, "rb") as wav:
        assert wav.getnframes() == total


def test_voice_clone_batch_reuses_one_prompt(app):
    joined, summary = app.batch("voice_clone", ["One.", "Two.", "Three."], "Auto", ref_audio=REFERENCE,
                                ref_text="This is the reference.")
    assert summary.lines == 3 and os.path.getsize(joined) > 44


def test_wav_writer_takes_torch_tensors(tmp_path):
    import torch

    with qvshim.WavWriter(tmp_path / "t.wav") as wav:
        assert wav.write(torch.tensor([0.0, 0.5, -1.0])) == 3
    with wave.open(str(tmp_path / "t.wav"), "rb") as wav:
        assert numpy.frombuffer(wav.readframes(3), "<i2").tolist() == [0, 16384, -32767]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_web_ui_serves_every_mode_under_the_shim_and_stops_on_ctrl_c(tiny_models, tmp_path):
    from gradio_client import Client, handle_file

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYTHONMALLOC")}
    env["PYTHONPATH"] = os.path.join(REPO_DIR, "python")
    env["QVSHIM_BUDGET"] = "4G"
    env["QVSHIM_LOG"] = "info"  # the start line is asserted below; the shim is silent by default
    command = [sys.executable, "-m", "qvshim", "run", os.path.join(REPO_DIR, "examples", "qwen_tts_webui.py"),
               "--custom-voice", tiny_models["custom_voice"], "--base", tiny_models["voice_clone"],
               "--voice-design", tiny_models["voice_design"], "--device", "cpu", "--port", str(port),
               "--max-new-tokens", str(MAX_NEW_TOKENS), "--out-dir", str(tmp_path / "out")]
    log = open(tmp_path / "server.log", "w+")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 180
        while "Running on local URL" not in (tmp_path / "server.log").read_text():
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the web UI never came up"
            time.sleep(0.5)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        spoken = client.predict("Hello there.", "English", "Vivian", "", api_name="/custom_voice")
        designed = client.predict("Hello there.", "Auto", "A calm voice.", api_name="/voice_design")
        reference = tmp_path / "reference.wav"
        with qvshim.WavWriter(reference) as wav:
            wav.write(REFERENCE[1])
        cloned = client.predict("Hello there.", "Auto", handle_file(str(reference)), "This is the reference.",
                                False, api_name="/voice_clone")
        joined, status = client.predict("custom_voice", "One.\nTwo.\nThree.", "Auto", "Ryan", "", None, "",
                                        api_name="/batch")
        for path in (spoken, designed, cloned, joined):
            with wave.open(path, "rb") as wav:
                assert wav.getnframes() > 0
        assert status.startswith("3 lines")
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    finally:
        server.kill()
        log.close()
    output = (tmp_path / "server.log").read_text()
    assert "[qvshim] INFO qvshim" in output and "host budget 4.00 GiB" in output, output
    assert "loaded model 'custom_voice'" in output and "loaded model 'voice_clone'" in output
    assert server.returncode in (0, 130), output


def test_memory_report_without_the_library_says_not_governed(app):
    def not_loaded():
        raise qvshim.NotLoaded()

    app.watcher = qvshim.events.StatsWatcher(read_stats=not_loaded)
    pools, feed = app.memory_report()
    assert "Not governed" in pools and feed == "", f"without the library the panel must say so: {pools!r}"


def test_memory_report_shows_the_pools_and_the_feed(app):
    app.speak("voice_design", "Hello.", "Auto", instruct="calm")
    pools, feed = app.memory_report()
    assert "<td>host</td>" in pools and "<th>budget</th>" in pools, pools
    assert "model Voice design loaded" in feed, f"the load must be in the feed, by its tab's name: {feed!r}"


def test_torch_refusing_a_line_is_a_memory_error_and_the_next_line_speaks(app, monkeypatch):
    # What torch's CPU allocator raises when the shim refuses it (seen under a 400 MiB-room budget).
    refusal = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 522283520 bytes. Error code 12 (Cannot allocate memory)")
    real = app._generate_with_model
    calls = []

    def refuse_once(*args):
        calls.append(args)
        if len(calls) == 1:
            raise refusal
        return real(*args)

    monkeypatch.setattr(app, "_generate_with_model", refuse_once)
    with pytest.raises(MemoryError, match="this line could not fit in memory.*the next one can be"):
        app.speak("custom_voice", "A long line.", "Auto", speaker="Ryan")
    assert "could not fit" in qvshim.events.recent()[-1].message
    rate, samples = app.speak("custom_voice", "A short line.", "Auto", speaker="Ryan")
    assert samples.size > 0
    other = RuntimeError("some other failure")
    monkeypatch.setattr(app, "_generate_with_model", lambda *args: (_ for _ in ()).throw(other))
    with pytest.raises(RuntimeError, match="some other failure"):
        app.speak("custom_voice", "Hello.", "Auto", speaker="Ryan")
