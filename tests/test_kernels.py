"""The compiled pool-and-fold kernels (CPU and CUDA) against the PyTorch reference."""
import warnings

import numpy as np
import pytest
import torch

import hsvfast
from hsvfast import _kernels
from conftest import DEVICES, NO_CUDA_EMULATOR, NO_CUDA_EMULATOR_REASON, requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


# Where the compiled kernels run: the CPU kernel, the CUDA kernel (on a GPU), and the CUDA kernel's own code
# emulated on the CPU (csrc/cuda_emulation.h) — so that every CI run, which has no GPU, tests it too.
EMULATED = pytest.param("cuda_emulated", marks=pytest.mark.skipif(NO_CUDA_EMULATOR, reason=NO_CUDA_EMULATOR_REASON))
TARGETS = DEVICES + [EMULATED]


def on(target: str) -> str:
    """The device a target's tensors live on."""
    return "cpu" if target == "cuda_emulated" else target


def compiled_backend(target: str) -> str:
    if target == "cuda_emulated":
        return target
    name = _kernels.backend(target)
    if name == "torch":
        pytest.fail(f"no compiled kernel for {target}: the extension is missing or was built without it")
    return name


def make_case(device, dtype, batch=13, tokens=11, dim=389, classes=4, layout="contiguous", seed=0):
    device = on(device)
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(batch, tokens, dim + 3, generator=g) * 3 + 50).to(device=device, dtype=dtype)
    if layout == "contiguous":
        act = full[:, :, :dim].contiguous()
    elif layout == "sliced":  # strided rows: a view into a wider buffer
        act = full[:, :, 1 : dim + 1]
    else:  # "transposed": hidden dimension not innermost
        act = full[:, :, :dim].transpose(1, 2).contiguous().transpose(1, 2)
    assert (layout == "contiguous") == act.is_contiguous()
    weights = (torch.rand(batch, tokens, generator=g) > 0.3).float()
    weights[:, 0] = 1.0
    weights[min(2, batch - 1)] *= torch.rand(tokens, generator=g) + 0.1  # non-binary weights too
    labels = torch.randint(0, classes, (batch,), generator=g)
    if batch > 3:
        labels[3] = -1  # skipped row
    out_rows = torch.randperm(batch, generator=g)
    shift = torch.randn(classes, dim, generator=g, dtype=torch.float64) + 50
    tensors = dict(weights=weights, labels=labels, out_rows=out_rows, shift=shift)
    return act, {k: v.to(device) for k, v in tensors.items()}


def run(act, case, use, with_stats=True):
    classes, dim = case["shift"].shape
    out = torch.full((act.shape[0], dim), float("nan"), dtype=torch.float64, device=act.device)
    sums = torch.zeros(classes, dim, dtype=torch.float64, device=act.device) + 1.0
    sqnorms = torch.zeros(classes, dtype=torch.float64, device=act.device) + 2.0
    nonfinite = torch.full((1,), _kernels.NO_BAD_BATCH, dtype=torch.int64, device=act.device)
    _kernels.pool_fold(act, case["weights"], out, labels=case["labels"], out_rows=case["out_rows"],
                       shift=case["shift"], sums=sums if with_stats else None,
                       sqnorms=sqnorms if with_stats else None, nonfinite=nonfinite, batch_index=5, use=use)
    return out, sums, sqnorms, int(nonfinite.item())


@pytest.mark.parametrize("device", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "transposed"])
def test_compiled_matches_reference(device, dtype, layout):
    act, case = make_case(device, dtype, layout=layout)
    expected = run(act, case, "torch")
    actual = run(act, case, compiled_backend(device))
    for a, e in zip(actual[:3], expected[:3]):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-9)
    assert actual[3] == expected[3] == _kernels.NO_BAD_BATCH
    skipped_row = case["out_rows"][3]
    assert torch.all(actual[0][skipped_row] == 0)


@pytest.mark.parametrize("device", TARGETS)
@pytest.mark.parametrize("batch,tokens,dim", [(1, 1, 1), (2, 3, 511), (3, 2, 513), (5, 7, 4100)])
def test_odd_sizes(device, batch, tokens, dim):
    act, case = make_case(device, torch.float32, batch=batch, tokens=tokens, dim=dim, classes=2, seed=batch)
    case["labels"] = case["labels"].clamp(min=0)
    expected = run(act, case, "torch")
    actual = run(act, case, compiled_backend(device))
    for a, e in zip(actual[:3], expected[:3]):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("device", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim,tokens", [(256, 3), (264, 37), (1000, 70)])
@pytest.mark.parametrize("offset", [0, 8, 1])  # 0 and 8: 16-byte aligned rows (CUDA fast path); 1: not
def test_fast_and_generic_paths_match_reference(device, dtype, dim, tokens, offset):
    act, case = make_case(device, dtype, batch=6, tokens=tokens, dim=dim, classes=3, seed=dim + tokens)
    g = torch.Generator().manual_seed(offset)
    wide = torch.randn(6, tokens, dim + 8, generator=g).to(on(device), dtype) * 3 + 50
    wide[:, :, offset : offset + dim] = act
    act = wide[:, :, offset : offset + dim]
    expected = run(act, case, "torch")
    actual = run(act, case, compiled_backend(device))
    for a, e in zip(actual[:3], expected[:3]):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-9)
    assert actual[3] == expected[3] == _kernels.NO_BAD_BATCH


@pytest.mark.parametrize("device", TARGETS)
@pytest.mark.parametrize("use", ["torch", "compiled"])
def test_nan_in_padding_is_never_read_but_nan_in_tokens_is_reported(device, use):
    use = compiled_backend(device) if use == "compiled" else use
    act, case = make_case(device, torch.float32)
    act = act.clone()
    padding = case["weights"] == 0
    act[padding] = float("nan")  # e.g. fully masked attention rows
    out, _, _, bad = run(act, case, use)
    assert torch.isfinite(out).all() and bad == _kernels.NO_BAD_BATCH
    act[0, 0, 7] = float("inf")  # a real token
    _, _, _, bad = run(act, case, use)
    assert bad == 5


@pytest.mark.parametrize("device", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 4, 5])  # 4 and 5: the CPU's four-token loop, and its remainder
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_every_16_bit_value_is_widened_exactly(device, dtype, tokens, layout):
    """All 65,536 bit patterns (normals, subnormals, ±0, ±inf, NaNs) pooled from equal tokens come out as
    PyTorch's own conversion to float64: nothing is flushed, rounded or lost."""
    use, device = compiled_backend(device), on(device)
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(128, 1, 512)
    act = values.expand(128, tokens, 512).contiguous().to(device)
    if layout == "transposed":  # hidden dimension not innermost: the generic (strided) paths
        act = act.transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.full((128, 512), 7.0, dtype=torch.float64, device=device)
    weights = torch.ones(128, tokens, device=device)
    _kernels.pool_fold(act, weights, out, labels=torch.zeros(128, dtype=torch.int64, device=device), use=use)
    torch.testing.assert_close(out.cpu(), values[:, 0].double(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", TARGETS)
def test_pooling_without_statistics(device):
    act, case = make_case(device, torch.bfloat16)
    expected = run(act, case, "torch", with_stats=False)[0]
    actual = run(act, case, compiled_backend(device), with_stats=False)[0]
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-9)


def _layer_stack(device, dtype, count, batch=9, tokens=13, seed=1):
    """``count`` layers of one batch: different widths (fast and generic CUDA paths side by side),
    contiguous, sliced, transposed and misaligned activations, each with its own accumulators."""
    device = on(device)
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(count):
        dim = (389, 256, 131, 264, 8)[i % 5]
        full = (torch.randn(batch, tokens, dim + 9, generator=g) * (i + 1) + 40 * i).to(device=device, dtype=dtype)
        layout = i % 4
        if layout == 0:
            act = full[:, :, :dim].contiguous()
        elif layout == 1:
            act = full[:, :, 8 : dim + 8]  # 16-byte aligned view
        elif layout == 2:
            act = full[:, :, :dim].transpose(1, 2).contiguous().transpose(1, 2)
        else:
            act = full[:, :, 1 : dim + 1]  # misaligned view
        classes = 3
        layers.append(dict(
            act=act,
            out=torch.full((batch + 1, dim), float("nan"), dtype=torch.float64, device=device),
            shift=(torch.randn(classes, dim, generator=g, dtype=torch.float64) + 40 * i).to(device),
            sums=torch.ones(classes, dim, dtype=torch.float64, device=device),
            sqnorms=torch.full((classes,), 2.0, dtype=torch.float64, device=device),
            nonfinite=torch.full((1,), _kernels.NO_BAD_BATCH, dtype=torch.int64, device=device),
        ))
    weights = (torch.rand(batch, tokens, generator=g) > 0.4).float()
    weights[:, 0] = 1.0
    weights[1] *= torch.rand(tokens, generator=g) + 0.1
    labels = torch.randint(0, 3, (batch,), generator=g)
    labels[2] = -1
    out_rows = torch.randperm(batch + 1, generator=g)[:batch]
    return layers, weights.to(device), labels.to(device), out_rows.to(device)


def _fold_layer_stack(layers, weights, labels, out_rows, **kwargs):
    """``_kernels.pool_fold_layers`` over the dicts of :func:`_layer_stack`."""
    _kernels.pool_fold_layers([a["act"] for a in layers], weights, [a["out"] for a in layers], labels, out_rows,
                              [a["shift"] for a in layers], [a["sums"] for a in layers],
                              [a["sqnorms"] for a in layers], [a["nonfinite"] for a in layers], **kwargs)


@pytest.mark.parametrize("device", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("count", [2, 7, 50])  # 50: more layers than one CUDA launch takes (48)
def test_several_layers_in_one_call_match_the_reference_layer_by_layer(device, dtype, count):
    use = compiled_backend(device)
    expected, weights, labels, out_rows = _layer_stack(device, dtype, count)
    actual = [{k: v.clone() for k, v in layer.items()} for layer in expected]
    actual[count - 1]["act"] = actual[count - 1]["act"].clone()
    actual[count - 1]["act"][0, 0, 3] = float("nan")  # a real token of the last layer
    expected[count - 1]["act"] = actual[count - 1]["act"]
    for layer in expected:
        _kernels.pool_fold(layer["act"], weights, layer["out"], labels=labels, out_rows=out_rows,
                           shift=layer["shift"], sums=layer["sums"], sqnorms=layer["sqnorms"],
                           nonfinite=layer["nonfinite"], batch_index=4, use="torch")
    _fold_layer_stack(actual, weights, labels, out_rows, batch_index=4, use=use)
    unused_row = sorted(set(range(len(out_rows) + 1)) - set(out_rows.tolist()))
    for i, (a, e) in enumerate(zip(actual, expected)):
        bad = i == count - 1  # its sums hold the NaN
        torch.testing.assert_close(a["out"], e["out"], rtol=1e-12, atol=1e-9, equal_nan=True,
                                   msg=lambda m: f"layer {i}: {m}")
        assert torch.all(a["out"][out_rows[2]] == 0)  # the skipped row
        assert torch.isnan(a["out"][unused_row]).all()  # rows no input maps to are left alone
        if not bad:
            torch.testing.assert_close(a["sums"], e["sums"], rtol=1e-12, atol=1e-9)
            torch.testing.assert_close(a["sqnorms"], e["sqnorms"], rtol=1e-12, atol=1e-9)
        assert int(a["nonfinite"].item()) == (4 if bad else _kernels.NO_BAD_BATCH)


@pytest.mark.parametrize("device", TARGETS)
@pytest.mark.parametrize("use", ["torch", "compiled"])
@pytest.mark.parametrize("count", [1, 3])
def test_batch_index_read_where_it_lies(device, use, count):
    """``batch_index_at`` (what a CUDA graph's launch reads, hsvfast.graphs): the index reported for a
    non-finite value is the tensor's at run time, not the ``batch_index`` argument."""
    use = compiled_backend(device) if use == "compiled" else use
    layers, weights, labels, out_rows = _layer_stack(device, torch.float32, count)
    layers[-1]["act"] = layers[-1]["act"].clone()
    layers[-1]["act"][0, 0, 3] = float("nan")
    at = torch.tensor([17], dtype=torch.int64, device=on(device))
    _fold_layer_stack(layers, weights, labels, out_rows, batch_index=4, use=use, batch_index_at=at)
    assert [int(a["nonfinite"].item()) for a in layers] == [_kernels.NO_BAD_BATCH] * (count - 1) + [17]


@pytest.mark.parametrize("use", ["torch", "compiled"])
@pytest.mark.parametrize("which", [0, 1])
def test_every_layer_must_have_the_weights_batch_and_tokens(use, which):
    # The kernels index the weights with each layer's (batch, tokens): a layer with more tokens than the
    # weights (or tokens-first states) would be read past or across them.
    layers, weights, labels, out_rows = _layer_stack("cpu", torch.float32, 2)
    layers[which]["act"] = torch.cat([layers[which]["act"]] * 2, dim=1)
    with pytest.raises(ValueError, match=r"the weights' batch and tokens"):
        _fold_layer_stack(layers, weights, labels, out_rows, use=None if use == "compiled" else use)
    act = layers[which]["act"]
    with pytest.raises(ValueError, match=r"weights must be \(batch, tokens\)"):
        _kernels.pool_fold(act, weights, torch.zeros(act.shape[0], act.shape[2], dtype=torch.float64),
                           use=None if use == "compiled" else use)


def test_reference_pools_by_hand():
    """The PyTorch reference itself against an explicit loop."""
    act, case = make_case("cpu", torch.float64, batch=4, tokens=5, dim=6)
    out, sums, sqnorms, _ = run(act, case, "torch")
    a, w = act.numpy(), case["weights"].numpy().astype(np.float64)
    for b in range(4):
        label = int(case["labels"][b])
        row = out[case["out_rows"][b]].numpy()
        if label < 0:
            assert np.all(row == 0)
            continue
        pooled = sum(w[b, t] * a[b, t] for t in range(5)) / w[b].sum()
        np.testing.assert_allclose(row, pooled - case["shift"][label].numpy(), rtol=1e-12, atol=1e-12)


def test_cuda_kernels_were_compiled():
    """CI has nvcc but no GPU: the CUDA code must still have been compiled into the module."""
    import os

    if os.environ.get("HSVFAST_EXPECT_CUDA_BUILD") != "1":
        pytest.skip("set HSVFAST_EXPECT_CUDA_BUILD=1 where nvcc is installed (CI does)")
    assert hsvfast.compiled_with_cuda()


def test_backend_names():
    assert hsvfast.backend() in ("cpp", "torch")
    assert hsvfast.backend("cpu") == hsvfast.backend()
    assert hsvfast.backend("meta") == "torch"


@requires_cuda
def test_cuda_kernel_runs_on_current_stream_without_sync():
    act, case = make_case("cuda", torch.bfloat16, batch=64, tokens=128, dim=1024)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        actual = run(act, case, "cuda")
    stream.synchronize()
    expected = run(act, case, "torch")
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-12, atol=1e-9)


def _pool_fold_kernels_launched(fn):
    """Names of the pool-and-fold CUDA kernels ``fn`` launched (from the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {event.name for event in prof.events() if "pool_fold_kernel" in event.name}


@pytest.mark.parametrize("target", [pytest.param("cuda", marks=requires_cuda), EMULATED])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 33, 257, 777])  # 777: groups of 32 tokens per warp, the last partial
def test_both_cuda_paths_pool_every_token_count_like_the_reference(target, dtype, tokens):
    """Each warp loads its next 32 token weights at once and hands them out by shuffles: token counts
    around those groups, on the 16-byte path and on the generic path (the same values one element
    off 16-byte alignment), against the PyTorch reference; then against each other — they add the same
    tokens in the same order, so the pooled rows agree to the bit (class sums and squared norms up to
    the order of their float64 atomics). Also a stack of layers of both paths in one launch."""
    use = compiled_backend(target)
    act, case = make_case(target, dtype, batch=9, tokens=tokens, dim=264)  # 264: 16-byte loads in every dtype
    misaligned = torch.empty(act.numel() + 1, dtype=dtype, device=act.device)[1:].view(act.shape)
    misaligned.copy_(act)
    expected = run(act, case, "torch")
    paths = {}
    for path, values, template_end in (("16-byte", act, ",true>"), ("generic", misaligned, ",false>")):
        paths[path] = run(values, case, use)
        for got, want in zip(paths[path][:3], expected[:3]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9, msg=lambda m: f"{path} path: {m}")
        assert paths[path][3] == _kernels.NO_BAD_BATCH
        if target == "cuda":  # which kernel ran (<Storage, 16-byte loads>): the profiler names CUDA launches
            launched = _pool_fold_kernels_launched(lambda: run(values, case, use))
            assert launched and all(template_end in name.replace(" ", "") for name in launched), (path, launched)

    layers, weights, labels, out_rows = _layer_stack(target, dtype, 7, tokens=tokens)
    reference = [{k: v.clone() for k, v in layer.items()} for layer in layers]
    _fold_layer_stack(layers, weights, labels, out_rows, use=use)
    _fold_layer_stack(reference, weights, labels, out_rows, use="torch")
    for i, (mine, theirs) in enumerate(zip(layers, reference)):
        for name in ("out", "sums", "sqnorms"):
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-12, atol=1e-9, equal_nan=True,
                                       msg=lambda m: f"layer {i} {name}: {m}")
        assert torch.equal(mine["nonfinite"], theirs["nonfinite"])

    fast, generic = paths["16-byte"], paths["generic"]
    assert torch.equal(fast[0], generic[0])
    for got, want in zip(fast[1:3], generic[1:3]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


@pytest.mark.parametrize("use", ["cpp", "cuda_emulated"])
def test_the_host_kernels_take_cpu_tensors_only(use):
    """Pointers of tensors elsewhere (meta here, whose device index reads -1 like the CPU's) are refused."""
    act, case = make_case("meta", torch.float32)
    with pytest.raises(ValueError, match="pass CPU tensors, not meta"):
        run(act, case, use)
    layers, weights, labels, out_rows = _layer_stack("meta", torch.float32, 2)
    with pytest.raises(ValueError, match="pass CPU tensors, not meta"):
        _fold_layer_stack(layers, weights, labels, out_rows, use=use)


def test_rejects_unsupported_input():
    act = torch.zeros(2, 3, 4, dtype=torch.int32)
    out = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        _kernels.pool_fold(act, torch.ones(2, 3), out)
    with pytest.raises(ValueError, match="batch, tokens, hidden"):
        _kernels.pool_fold(torch.zeros(2, 3), torch.ones(2, 3), out)
    if _kernels.backend("cpu") == "cpp":
        with pytest.raises(ValueError, match="weights must be a contiguous torch.float32"):
            _kernels.pool_fold(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.float64), out)


class _CoreFinder:
    """An import finder for ``hsvfast._C`` alone: a module that fails to load (a build for another Python), or
    none at all (a source folder that was never built)."""

    def __init__(self, missing: bool) -> None:
        self.missing = missing

    def find_spec(self, name, path=None, target=None):
        import importlib.util

        if name != "hsvfast._C":
            return None
        if self.missing:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError("_C.cpython-311-x86_64-linux-gnu.so: undefined symbol: PyFoo")


@pytest.mark.parametrize("missing, reason", [(False, r"does not load \(.*undefined symbol: PyFoo\)"),
                                             (True, r"is not built \(is hsvfast imported from its source folder\?\)")])
def test_a_compiled_core_that_is_missing_or_does_not_load_is_reported_not_silently_replaced(missing, reason,
                                                                                             monkeypatch):
    import importlib
    import sys

    before = _kernels.backend("cpu")
    monkeypatch.delitem(sys.modules, "hsvfast._C", raising=False)
    monkeypatch.delattr(hsvfast, "_C", raising=False)  # else `from . import _C` takes the package's attribute
    monkeypatch.setattr(sys, "meta_path", [_CoreFinder(missing), *sys.meta_path])
    monkeypatch.delenv("HSVFAST_BACKEND", raising=False)
    try:
        with pytest.warns(RuntimeWarning, match=f"compiled core {reason}: scoring falls back to the much slower"):
            importlib.reload(_kernels)
        assert _kernels.backend("cpu") == "torch"
        monkeypatch.setenv("HSVFAST_BACKEND", "torch")  # asked for the reference: nothing to warn about
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            importlib.reload(_kernels)
    finally:
        monkeypatch.undo()
        importlib.reload(_kernels)
    assert _kernels.backend("cpu") == before
