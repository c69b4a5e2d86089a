"""A stand-in for PyTorch for the relief tests (shim-tests/fake_cuda/test_cuda_relief.py): no GPU,
no CUDA; each call the shim's relief can make is appended to the file STANDIN_TORCH_LOG names, as
"<what> <pid>", and so is the import itself, so a test sees an import made on the app's behalf
even after the module was taken out of sys.modules."""

import os as _os


def _record(what: str) -> None:
    path = _os.environ.get("STANDIN_TORCH_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{what} {_os.getpid()}\n")


_record("import")

from . import cuda  # noqa: E402,F401
