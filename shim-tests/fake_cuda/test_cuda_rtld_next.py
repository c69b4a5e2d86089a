"""dlsym(RTLD_NEXT, ...) from another library still finds the definition after that library:
the shim's dlsym hook must not change whom glibc sees as the caller."""

from __future__ import annotations

from fakecuda import BUILD_DIR, SHIM, run


def test_library_wrapping_write_with_rtld_next_reaches_libc_under_the_shim(fake_cuda):
    result = run(["rtld_next_main"])
    assert result.returncode == 0, f"expected exit 0 (3 means write() recursed)\n{result.describe()}"
    assert "hello through write" in result.stdout, result.describe()
    assert result.facts.get("next_object") == "libc.so.6", result.describe()
    assert result.number("calls") >= 1, result.describe()


def test_rtld_next_also_works_when_the_wrapping_library_is_preloaded_after_the_shim(fake_cuda):
    result = run(["rtld_next_main"], preload=f"{SHIM} {BUILD_DIR / 'libwrapwrite.so'}")
    assert result.returncode == 0, result.describe()
    assert result.facts.get("next_object") == "libc.so.6", result.describe()


def test_control_a_dlsym_hook_that_calls_instead_of_jumping_breaks_rtld_next(fake_cuda):
    result = run(["rtld_next_main"], preload=str(BUILD_DIR / "naive_dlsym.so"))
    assert result.returncode == 3, (
        f"expected the naive hook to send write() back into itself (exit 3)\n{result.describe()}")
