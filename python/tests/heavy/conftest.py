"""The heavy tier: the qwen-tts web UI example on a tiny random Qwen3-TTS checkpoint, under the shim.

Run: .venv/bin/python -m qvshim run -m pytest python/tests/heavy (see docs/PYTHON.md).
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.join(REPO_DIR, "python"))
sys.path.insert(0, os.path.join(REPO_DIR, "examples"))
sys.path.insert(0, HERE)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Three tiny checkpoints: {"custom_voice": dir, "voice_clone": dir (a Base model), "voice_design": dir}."""
    import tiny_qwen_tts

    root = tmp_path_factory.mktemp("tiny_qwen_tts")
    return {
        "custom_voice": tiny_qwen_tts.build(str(root / "custom_voice"), "custom_voice"),
        "voice_clone": tiny_qwen_tts.build(str(root / "base"), "base"),
        "voice_design": tiny_qwen_tts.build(str(root / "voice_design"), "voice_design"),
    }
