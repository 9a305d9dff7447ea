"""compute-sanitizer's memcheck for the CUDA kernel, on the CPU: its own code, emulated (csrc/cuda_emulation.h)
and built with AddressSanitizer, reads and writes only the bytes of the buffers it is given (tests/cuda_memcheck.cpp).
On a GPU, benchmarks/gpu_check.sh runs compute-sanitizer itself."""
import os
import shutil
import subprocess

import pytest

from conftest import REPO, _missing


@pytest.fixture(scope="module")
def memcheck(tmp_path_factory):
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        _missing("a C++ compiler (g++)")
    exe = tmp_path_factory.mktemp("memcheck") / "cuda_memcheck"
    build = subprocess.run(
        [compiler, "-std=c++17", "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-fno-strict-aliasing",
         "-Wno-unknown-pragmas", f"-I{REPO / 'csrc'}", str(REPO / "tests" / "cuda_memcheck.cpp"),
         str(REPO / "csrc" / "pool_fold_cuda_emulated.cpp"), "-o", str(exe)],
        capture_output=True, text=True)
    if build.returncode != 0 and "asan" in build.stderr.lower():  # a compiler without its sanitizer runtime
        _missing(f"AddressSanitizer for {compiler} (libasan): {build.stderr.strip()[-300:]}")
    assert build.returncode == 0, build.stderr[-4000:]

    def run(*args):
        # ASan warns once that it does not fully support swapcontext; its reports below are the ones that count.
        return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0"})
    return run


def test_the_cuda_kernel_touches_only_its_buffers(memcheck):
    result = memcheck()
    assert result.returncode == 0 and "ERROR: AddressSanitizer" not in result.stderr, result.stderr[-4000:]
    assert result.stdout.strip() == "288 cases"  # 4 dtypes × 3 layouts × 4 token counts × 6 widths


def test_a_read_past_a_buffer_is_reported(memcheck):
    """The same cases with every activation buffer one element short: the check can fail."""
    result = memcheck("short")
    assert result.returncode != 0 and "heap-buffer-overflow" in result.stderr, \
        (result.returncode, result.stderr[-2000:])
