"""torch.cuda as the shim's relief sees it: initialised unless STANDIN_CUDA_INITIALIZED=0."""

import os as _os

from . import _record


def is_available() -> bool:
    _record("is_available")
    return True


def is_initialized() -> bool:
    _record("is_initialized")
    return _os.environ.get("STANDIN_CUDA_INITIALIZED", "1") == "1"


def empty_cache() -> None:
    _record("empty_cache")
