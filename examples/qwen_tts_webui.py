#!/usr/bin/env python3
"""A small Gradio web UI over the official qwen-tts package, governed by qvshim.

Three modes (custom voice, voice clone, voice design) and batch generation. The models load
on first use and leave after --keep-alive idle seconds (qvshim.ModelManager, which also
checks each load against the shim's headroom and unloads idle models at critical pressure);
batch audio is written line by line to disk (qvshim.generate_batches / WavWriter), so a batch
of any length costs the memory of one batch. Model directories are yours: nothing is
downloaded. Run it under the shim with one command:

    python -m qvshim run examples/qwen_tts_webui.py \\
        --custom-voice /models/Qwen3-TTS-12Hz-1.7B-CustomVoice \\
        --base /models/Qwen3-TTS-12Hz-1.7B-Base \\
        --voice-design /models/Qwen3-TTS-12Hz-1.7B-VoiceDesign

Needs: pip install qwen-tts (which brings gradio, torch and transformers).
"""

import argparse
import html
import json
import os
import sys
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # model directories are local; never reach for a hub

import qvshim  # noqa: E402

MODES = {  # mode -> (label, the qwen-tts model type its directory must hold)
    "custom_voice": ("Custom voice", "custom_voice"),
    "voice_clone": ("Voice clone", "base"),
    "voice_design": ("Voice design", "voice_design"),
}
DEFAULT_LANGUAGES = ["Auto"]
MEMORY_REFRESH_S = 1.5  # how often the memory panel reads the pools while a page is open
MEMORY_EVENTS_SHOWN = 12  # the newest lines of the companion's feed under the pools


def read_model_config(directory):
    """Speakers and languages from a model directory's config.json, without loading the model."""
    with open(os.path.join(directory, "config.json")) as source:
        config = json.load(source)
    talker = config.get("talker_config", {})
    languages = ["Auto"] + sorted(
        name.capitalize() for name in talker.get("codec_language_id", {}) if "dialect" not in name
    )
    speakers = sorted(name.capitalize() for name in talker.get("spk_id", {}) or {})
    return {"type": config.get("tts_model_type"), "languages": languages, "speakers": speakers}


class TTSApp:
    """The web UI's work, separate from its widgets so it can be driven (and tested) directly."""

    def __init__(self, model_dirs, device="cpu", dtype="float32", keep_alive=300, out_dir="qwen_tts_output",
                 batch_size=qvshim.batch.DEFAULT_BATCH_SIZE, generate_kwargs=None):
        self.model_dirs = {mode: path for mode, path in model_dirs.items() if path}
        if not self.model_dirs:
            raise ValueError("give at least one model directory (--custom-voice, --base or --voice-design)")
        self.configs = {}
        for mode, path in self.model_dirs.items():
            config = read_model_config(path)
            if config["type"] != MODES[mode][1]:
                raise ValueError(f"{path} holds a {config['type']!r} model; {MODES[mode][0]} needs {MODES[mode][1]!r}")
            self.configs[mode] = config
        self.device = device
        self.dtype = dtype
        self.out_dir = out_dir
        self.batch_size = batch_size
        self.generate_kwargs = dict(generate_kwargs or {})
        pool = qvshim.gpu_pool(int(device.split(":")[1]) if ":" in device else 0) if device.startswith("cuda") else qvshim.POOL_HOST
        self.models = qvshim.ModelManager(keep_alive=keep_alive, pool=pool)
        self.watcher = qvshim.events.StatsWatcher()  # the shim's refusals and level changes, as lines

    # -- models ----------------------------------------------------------------------------

    def _loader(self, mode):
        def load():
            import torch
            from qwen_tts import Qwen3TTSModel

            return Qwen3TTSModel.from_pretrained(self.model_dirs[mode], device_map=self.device,
                                                 dtype=getattr(torch, self.dtype))
        return load

    def use(self, mode):
        if mode not in self.model_dirs:
            raise ValueError(f"no model directory was given for {MODES[mode][0].lower()}")
        return self.models.use(mode, self._loader(mode), path=self.model_dirs[mode])

    # -- one line at a time ----------------------------------------------------------------

    def _generate(self, mode, texts, language, speaker=None, instruct=None, clone_prompt=None):
        """(wavs, sample_rate) for a list of texts, with the model held only while it runs.

        torch reports a refused allocation as RuntimeError (CPU) or torch.OutOfMemoryError (GPU);
        both leave here as MemoryError, so a batch retries in halves and the UI says what happened.
        """
        try:
            return self._generate_with_model(mode, texts, language, speaker, instruct, clone_prompt)
        except RuntimeError as error:
            if not _is_out_of_memory(error):
                raise
            raise MemoryError(f"{_first_line(error)}") from error

    def _generate_with_model(self, mode, texts, language, speaker, instruct, clone_prompt):
        with self.use(mode) as tts:
            if mode == "custom_voice":
                return tts.generate_custom_voice(text=texts, speaker=speaker, language=language,
                                                 instruct=instruct or None, **self.generate_kwargs)
            if mode == "voice_design":
                return tts.generate_voice_design(text=texts, instruct=instruct or "", language=language,
                                                 **self.generate_kwargs)
            return tts.generate_voice_clone(text=texts, language=language, voice_clone_prompt=clone_prompt,
                                            **self.generate_kwargs)

    def clone_prompt(self, ref_audio, ref_text, x_vector_only):
        """The voice-clone prompt for reference audio ((sample_rate, samples) as Gradio gives it)."""
        if ref_audio is None:
            raise ValueError("voice clone needs a reference recording")
        rate, samples = ref_audio
        samples = _to_float_mono(samples)
        with self.use("voice_clone") as tts:
            return tts.create_voice_clone_prompt(ref_audio=(samples, rate), ref_text=ref_text or None,
                                                 x_vector_only_mode=bool(x_vector_only) or not ref_text)

    def speak(self, mode, text, language, speaker=None, instruct=None, ref_audio=None, ref_text=None,
              x_vector_only=False):
        """One text; returns (sample_rate, samples) as Gradio's Audio output takes it."""
        if not text or not text.strip():
            raise ValueError("there is no text to speak")
        prompt = self.clone_prompt(ref_audio, ref_text, x_vector_only) if mode == "voice_clone" else None
        try:
            wavs, rate = self._generate(mode, [text], language, speaker, instruct, prompt)
        except MemoryError as error:
            if not isinstance(error, qvshim.ModelDoesNotFit):  # the manager has recorded those itself
                qvshim.events.record("line", f"a {MODES[mode][0].lower()} line of {len(text)} characters "
                                             f"could not fit: {_first_line(error)}")
            raise MemoryError(f"this line could not fit in memory and was not spoken ({_first_line(error)}); "
                              "the next one can be") from error
        return rate, wavs[0]

    # -- batches ---------------------------------------------------------------------------

    def batch(self, mode, lines, language, speaker=None, instruct=None, ref_audio=None, ref_text=None,
              x_vector_only=False, on_written=None):
        """Every non-empty line spoken into its own WAV and one joined WAV; returns (joined path, summary)."""
        texts = [line.strip() for line in lines if line.strip()]
        if not texts:
            raise ValueError("there are no lines to speak")
        prompt = self.clone_prompt(ref_audio, ref_text, x_vector_only) if mode == "voice_clone" else None
        run_dir = os.path.join(self.out_dir, f"batch-{time.strftime('%Y%m%d-%H%M%S')}-{mode}")
        joined = os.path.join(run_dir, "all.wav")

        def generate(batch):
            return self._generate(mode, batch, language, speaker, instruct, prompt)

        summary = qvshim.generate_batches(texts, generate, run_dir, batch_size=self.batch_size,
                                          combined=joined, on_written=on_written)
        return joined, summary

    # -- memory ----------------------------------------------------------------------------

    def memory_report(self):
        """(pools HTML, events HTML) for the memory panel: qvshim's pools and the companion's feed."""
        pools = self.watcher.poll()
        if pools is None:
            return ('<p class="qvshim-ungoverned"><b>Not governed:</b> this app is not running under qvshim, so '
                    "nothing bounds its memory. Start it with <code>python -m qvshim run "
                    "examples/qwen_tts_webui.py ...</code></p>", "")
        rows = "".join(
            f"<tr><td>{html.escape(p['name'])}</td><td>{_size(p['live'])}</td><td>{_budget(p['effective_budget'])}</td>"
            f"<td>{html.escape(p['level_name'])}</td><td>{_size(p['peak'])}</td><td>{p['refusals']}</td></tr>"
            for p in pools)
        table = ('<table class="qvshim-pools"><thead><tr><th>pool</th><th>live</th><th>budget</th><th>level</th>'
                 f"<th>peak</th><th>refused</th></tr></thead><tbody>{rows}</tbody></table>")
        recent = qvshim.events.recent()[-MEMORY_EVENTS_SHOWN:]
        if not recent:
            return table, '<p class="qvshim-events">No loads, unloads or refusals yet.</p>'
        lines = "".join(
            f"<li>{time.strftime('%H:%M:%S', time.localtime(event.time))} "
            f"{html.escape(self._readable(event.message))}</li>"
            for event in recent)
        return table, f'<ul class="qvshim-events">{lines}</ul>'

    @staticmethod
    def _readable(message):
        for mode, (label, _) in MODES.items():
            message = message.replace(repr(mode), label)
        return message

    def close(self):
        self.models.close()


def _is_out_of_memory(error):
    # torch's CPU allocator raises RuntimeError("... DefaultCPUAllocator: can't allocate memory ...").
    return type(error).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(error)


def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


UNLIMITED_BYTES = 2**64 - 1  # a pool's budget when it is off


def _size(n_bytes):
    for unit, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n_bytes >= unit:
            return f"{n_bytes / unit:.1f} {name}"
    return f"{n_bytes} B"


def _budget(n_bytes):
    return "off" if n_bytes >= UNLIMITED_BYTES else _size(n_bytes)


def _to_float_mono(samples):
    import numpy

    samples = numpy.asarray(samples)
    if samples.dtype.kind in "iu":
        samples = samples.astype(numpy.float32) / float(numpy.iinfo(samples.dtype).max)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    return samples.astype(numpy.float32)


def build_ui(app):
    """The Gradio Blocks: one tab per mode the app has a model for, and a batch tab."""
    import gradio as gr

    def languages(mode):
        return app.configs[mode]["languages"] if mode in app.configs else DEFAULT_LANGUAGES

    def fail_as_gradio(function):
        def wrapped(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except (ValueError, MemoryError) as error:
                raise gr.Error(str(error)) from error
        wrapped.__name__ = function.__name__
        return wrapped

    # Only the modes with a model get a tab: a hidden first tab would still be the selected one,
    # and the page would open blank (the Batch tab is always there and always usable).
    with gr.Blocks(title="Qwen3-TTS under qvshim") as ui:
        gr.Markdown("# Qwen3-TTS\nModels load on first use and leave when idle; memory is governed by qvshim.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                with gr.Tabs():
                    if "custom_voice" in app.configs:
                        with gr.Tab(MODES["custom_voice"][0], id="custom_voice"):
                            speakers = app.configs["custom_voice"]["speakers"]
                            cv_text = gr.Textbox(label="Text", lines=3)
                            cv_language = gr.Dropdown(languages("custom_voice"), value="Auto", label="Language")
                            cv_speaker = gr.Dropdown(speakers, value=speakers[0] if speakers else None, label="Speaker")
                            cv_instruct = gr.Textbox(label="Instruction (optional)")
                            cv_audio = gr.Audio(label="Speech", type="numpy", elem_id="custom-voice-speech")
                            gr.Button("Speak").click(
                                fail_as_gradio(lambda t, l, s, i: app.speak("custom_voice", t, l, speaker=s,
                                                                        instruct=i)),
                                [cv_text, cv_language, cv_speaker, cv_instruct], cv_audio, api_name="custom_voice")
                    if "voice_clone" in app.configs:
                        with gr.Tab(MODES["voice_clone"][0], id="voice_clone"):
                            vc_text = gr.Textbox(label="Text", lines=3)
                            vc_language = gr.Dropdown(languages("voice_clone"), value="Auto", label="Language")
                            vc_ref = gr.Audio(label="Reference recording", type="numpy")
                            vc_ref_text = gr.Textbox(label="What the reference says (empty: voice only)")
                            vc_xvec = gr.Checkbox(label="Use the voice only, not the words", value=False)
                            vc_audio = gr.Audio(label="Speech", type="numpy", elem_id="voice-clone-speech")
                            gr.Button("Speak").click(
                                fail_as_gradio(lambda t, l, r, rt, x: app.speak("voice_clone", t, l, ref_audio=r,
                                                                                ref_text=rt, x_vector_only=x)),
                                [vc_text, vc_language, vc_ref, vc_ref_text, vc_xvec], vc_audio, api_name="voice_clone")
                    if "voice_design" in app.configs:
                        with gr.Tab(MODES["voice_design"][0], id="voice_design"):
                            vd_text = gr.Textbox(label="Text", lines=3)
                            vd_language = gr.Dropdown(languages("voice_design"), value="Auto", label="Language")
                            vd_instruct = gr.Textbox(label="Describe the voice", lines=2)
                            vd_audio = gr.Audio(label="Speech", type="numpy", elem_id="voice-design-speech")
                            gr.Button("Speak").click(
                                fail_as_gradio(lambda t, l, i: app.speak("voice_design", t, l, instruct=i)),
                                [vd_text, vd_language, vd_instruct], vd_audio, api_name="voice_design")
                    with gr.Tab("Batch"):
                        modes = [mode for mode in MODES if mode in app.configs]
                        b_mode = gr.Radio([(MODES[m][0], m) for m in modes], value=modes[0], label="Mode")
                        b_lines = gr.Textbox(label="Lines (one per line)", lines=10)
                        b_language = gr.Dropdown(sorted({lang for m in modes for lang in languages(m)}), value="Auto",
                                                 label="Language")
                        all_speakers = app.configs.get("custom_voice", {}).get("speakers", [])
                        b_speaker = gr.Dropdown(all_speakers, value=all_speakers[0] if all_speakers else None,
                                                label="Speaker (custom voice)")
                        b_instruct = gr.Textbox(label="Instruction / voice description")
                        b_ref = gr.Audio(label="Reference recording (voice clone)", type="numpy")
                        b_ref_text = gr.Textbox(label="What the reference says (voice clone)")
                        b_file = gr.File(label="All lines, joined", elem_id="batch-file")
                        b_status = gr.Textbox(label="Status", elem_id="batch-status")

                        def run_batch(mode, lines, language, speaker, instruct, ref, ref_text,
                                      progress=gr.Progress()):
                            texts = lines.splitlines()
                            total = max(1, sum(1 for t in texts if t.strip()))

                            def written(index, path, seconds):
                                progress((index + 1) / total, desc=f"line {index + 1} of {total} written")

                            joined, summary = app.batch(mode, texts, language, speaker=speaker, instruct=instruct,
                                                        ref_audio=ref, ref_text=ref_text, on_written=written)
                            return joined, (f"{summary.lines} lines, {summary.seconds:.1f} s of audio "
                                            f"in {summary.out_dir}")

                        gr.Button("Speak all").click(
                            fail_as_gradio(run_batch),
                            [b_mode, b_lines, b_language, b_speaker, b_instruct, b_ref, b_ref_text], [b_file, b_status],
                            api_name="batch")
            # The memory panel reads the pools on a timer of its own, outside the queue's one-at-a-time
            # limit, so it keeps moving while a batch runs.
            with gr.Column(scale=2, elem_id="memory-panel"):
                gr.Markdown("### Memory")
                mem_pools = gr.HTML(elem_id="memory-pools")
                mem_events = gr.HTML(elem_id="memory-events")
        refresh = dict(fn=app.memory_report, inputs=None, outputs=[mem_pools, mem_events], show_progress="hidden",
                       concurrency_limit=None)
        gr.Timer(MEMORY_REFRESH_S).tick(**refresh)
        ui.load(**refresh)
    return ui


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--custom-voice", metavar="DIR", help="a Qwen3-TTS CustomVoice model directory")
    parser.add_argument("--base", metavar="DIR", help="a Qwen3-TTS Base model directory (voice clone)")
    parser.add_argument("--voice-design", metavar="DIR", help="a Qwen3-TTS VoiceDesign model directory")
    parser.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 when available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on GPU)")
    parser.add_argument("--keep-alive", type=float, default=300, help="seconds an idle model stays loaded (300)")
    parser.add_argument("--out-dir", default="qwen_tts_output", help="where batch audio is written")
    parser.add_argument("--batch-size", type=int, default=qvshim.batch.DEFAULT_BATCH_SIZE, help="lines per batch")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap on codec tokens per line")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not qvshim.is_loaded():
        print("note: not running under qvshim; start with `python -m qvshim run examples/qwen_tts_webui.py ...` "
              "for a budget", file=sys.stderr)
    import torch

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    generate_kwargs = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    try:
        app = TTSApp({"custom_voice": args.custom_voice, "voice_clone": args.base,
                      "voice_design": args.voice_design},
                     device=device, dtype=dtype, keep_alive=args.keep_alive, out_dir=args.out_dir,
                     batch_size=args.batch_size, generate_kwargs=generate_kwargs)
    except (ValueError, OSError) as error:
        print(f"qwen_tts_webui: {error}", file=sys.stderr)
        return 2
    ui = build_ui(app)
    print(f"models: {', '.join(f'{MODES[m][0]}={p}' for m, p in app.model_dirs.items())}; device {device}, {dtype}",
          flush=True)
    ui.queue().launch(server_name=args.host, server_port=args.port, show_error=True)
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
