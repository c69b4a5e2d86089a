"""Time qwen-tts generation on CPU with the heavy tier's tiny random checkpoint, for
scripts/bench-qwen-tts. Not a test.

usage: python qwen_tts_generate.py MODEL_DIR LINES

Builds the custom-voice checkpoint into MODEL_DIR if it is not there yet
(python/tests/heavy/tiny_qwen_tts.py), loads it, generates one warm-up line, then LINES lines
of 8 codec tokens each, and prints `allocator=... seconds=...`: the time of those LINES
generations alone (not the imports, the load or the warm-up).
"""

import ctypes
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
sys.path.insert(0, os.path.join(REPO, "python", "tests", "heavy"))

MAX_NEW_TOKENS = 8


def allocator_name():
    process = ctypes.CDLL(None)
    for symbol, name in (("qvshim_extent_prototype", "qvshim-extent"), ("qvshim_pool_stats", "qvshim"),
                         ("mallctl", "jemalloc")):
        if hasattr(process, symbol):
            return name
    return "glibc"


def main():
    model_dir, lines = sys.argv[1], int(sys.argv[2])
    import torch

    torch.manual_seed(0)
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        import tiny_qwen_tts

        tiny_qwen_tts.build(model_dir, "custom_voice")
    from qwen_tts import Qwen3TTSModel

    tts = Qwen3TTSModel.from_pretrained(model_dir, device_map="cpu", dtype=torch.float32)

    def one(i):
        torch.manual_seed(i)
        return tts.generate_custom_voice(text=f"Hello world, line {i} of the benchmark.", speaker="Vivian",
                                         language="English", max_new_tokens=MAX_NEW_TOKENS)

    one(0)
    started = time.perf_counter()
    for i in range(lines):
        one(i + 1)
    seconds = time.perf_counter() - started
    print(f"allocator={allocator_name()} seconds={seconds:.4f}")


if __name__ == "__main__":
    main()
