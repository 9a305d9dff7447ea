"""score(cuda_graphs=True / "auto", the default): batches replayed from a graph per shape give the eager statistics.

On the CPU the graphs are emulated (:class:`ReplayGraphs`): a "capture" records nothing but the
pass to run, a "replay" runs it again from the static buffers — and checks that the pooling
kernel is launched with exactly the arguments of the warm-up that preceded the capture (every
address but the activations'), which is what a real graph would replay. That tests the
bookkeeping (padding, static inputs and plans, the device-side batch index, recapture when the
statistics' buffers move) everywhere; the tests marked requires_cuda run real graphs.
"""
import sys
import time
import types
import warnings

import numpy as np
import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hsvfast
from conftest import REPO, assert_same_statistics, requires_cuda
from hsvfast import _kernels, graphs, scoring
from tiny_models import DECODERS, ENCODERS, VOCAB, random_batches, tiny_model


class _RecordingCore:
    """``_kernels._C`` with pool_fold_layers' arguments recorded (activation addresses blanked)."""

    def __init__(self, core):
        self.core, self.launches = core, []

    def __getattr__(self, name):
        return getattr(self.core, name)

    def pool_fold_layers(self, dtype, batch, tokens, weights, labels, out_rows, batch_index, flat, device, stream,
                         batch_index_at=0):
        fixed = list(flat)
        fixed[0::10] = [None] * (len(flat) // 10)  # the activations: graph-internal memory
        self.launches.append((dtype, batch, tokens, weights, labels, out_rows, tuple(fixed), device, batch_index_at))
        return self.core.pool_fold_layers(dtype, batch, tokens, weights, labels, out_rows, batch_index, flat, device,
                                          stream, batch_index_at)


class ReplayGraphs(graphs.ForwardGraphs):
    """CUDA graphs emulated on the CPU (see the module docstring)."""

    instances = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.core = _kernels._C = _RecordingCore(_kernels._C)
        ReplayGraphs.instances.append(self)

    def new_graph(self):
        graph = types.SimpleNamespace()
        graph.replay = lambda: self._replay(graph)
        return graph

    def warm_up(self, run):
        self.core.launches.clear()
        run()
        self.warm_launches = list(self.core.launches)

    def capture(self, graph, run):
        graph.run, graph.launches, graph.model_buffers = run, self.warm_launches, self.watch()

    def _replay(self, graph):
        # A real graph reads the model's buffers where they were at capture: they must still be there.
        assert self.watch() == graph.model_buffers, "a replay would read model buffers that have moved"
        self.core.launches.clear()
        graph.run()
        self._model_ran = True  # this emulated replay ran the model's Python (a real one runs none)
        assert self.core.launches == graph.launches, "a replay would launch the kernel with other arguments"


@pytest.fixture
def emulated(monkeypatch):
    """score(cuda_graphs=True) on the CPU, through ReplayGraphs; yields the list of instances."""
    monkeypatch.setattr(scoring, "ForwardGraphs", ReplayGraphs)
    monkeypatch.setattr(scoring, "graphs_supported", lambda device: True)
    monkeypatch.setattr(_kernels, "_C", _kernels._C)  # restored after ReplayGraphs wraps it
    ReplayGraphs.instances = []
    yield ReplayGraphs.instances


def mixed_length_batches(lengths=(5, 7, 8, 6, 10, 13, 16, 12, 5, 14), classes=3, seed=0):
    """Batches of several token counts (padded to 8 and 16 in graphs: every shape recurs)."""
    batches = []
    for i, length in enumerate(lengths):
        batches += random_batches(1, batch_size=12, max_len=length, classes=classes, seed=seed + i)
    return batches


def _counts(batches):
    labels = np.concatenate([b["labels"].numpy() for b in batches])
    return dict(zip(*np.unique(labels, return_counts=True)))


def test_how_the_batches_ran_is_saved_with_the_statistics(emulated, tmp_path):
    report = hsvfast.score(tiny_model("bert").double(), mixed_length_batches(), cuda_graphs=True)
    assert report.stats.info["cuda_graphs"] == {"replayed": 5, "captured": 2, "eager": 3}
    report.stats.save(tmp_path / "s.safetensors")
    assert hsvfast.load_statistics(tmp_path / "s.safetensors").info["cuda_graphs"] == report.stats.info["cuda_graphs"]


@pytest.mark.parametrize("kind", ENCODERS + DECODERS)
def test_emulated_graphs_give_the_eager_statistics(kind, emulated):
    model = tiny_model(kind).double()
    batches = mixed_length_batches()
    try:  # transformers before ~4.42 built Qwen2's and Mistral's float64 causal masks from a float32 fill
        with torch.inference_mode():
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    except RuntimeError as error:
        pytest.skip(f"transformers {transformers.__version__} cannot run {kind} in float64: {error}")
    eager = hsvfast.score(model, batches, cuda_graphs=False)
    graphed = hsvfast.score(model, batches, cuda_graphs=True)
    assert_same_statistics(graphed.stats, eager.stats, rtol=1e-9)
    # Padded to 8, 8, 8, 8, 16, 16, 16, 16, 8, 16 tokens: batch 0 (first folds) and each shape's first
    # sighting (1, 4) run eagerly, the second (2, 5) is captured, the rest replayed.
    assert dict(emulated[0].counts) == {"eager": 3, "captured": 2, "replayed": 5}


def _sweep_names():
    from test_architectures import SWEEP
    return list(SWEEP)


class _Downcasts(TorchDispatchMode):
    """Records the operators that turn float64 inputs into float32 / 16-bit outputs."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.dtype for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        outputs = {t.dtype for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        if torch.float64 in inputs and outputs & {torch.float32, torch.float16, torch.bfloat16}:
            self.seen.add(str(func))
        return out


def test_downcasts_are_found():
    with _Downcasts() as found:
        torch.ones(3, dtype=torch.float64).sum()
    assert not found.seen
    with _Downcasts() as found:
        torch.ones(3, dtype=torch.float64).softmax(0, dtype=torch.float32)
    assert found.seen, "a float64 softmax computed in float32 went unnoticed"


@pytest.mark.parametrize("name", _sweep_names())
def test_emulated_graphs_give_the_eager_metrics_for_every_architecture_of_the_sweep(name, emulated):
    """Shared groups, tokens-first states, padding inside the model, encoders of encoder-decoders, hybrid
    and MoE blocks (test_architectures.SWEEP): padded to 16 tokens in graphs, the eager pass's ν and trace
    ratio — in float64 to 1e-12, in float32 where the model runs only in it (MoE grouped matmuls)."""
    from test_architectures import SWEEP

    model = SWEEP[name]()
    batches = mixed_length_batches(lengths=(9, 16, 11, 15, 14, 10))
    try:
        model, rtol = model.double(), 1e-12
        with _Downcasts() as downcasts:
            eager = hsvfast.score(model, batches, pooling="mean_all", cuda_graphs=False)
        if downcasts.seen:  # float64 rounded to float32 inside (XLM's softmax, RMSNorms): padding may flip
            rtol = 1e-6     # a float32 rounding (XLM 1e-10, Gemma 2 1e-8 apart on an AVX-512 CPU)
    except RuntimeError:
        model, rtol = model.float(), 1e-6
        eager = hsvfast.score(model, batches, pooling="mean_all", cuda_graphs=False)
    graphed = hsvfast.score(model, batches, pooling="mean_all", cuda_graphs=True)
    for metric in eager.metrics:
        np.testing.assert_allclose(graphed.metrics[metric], eager.metrics[metric], rtol=rtol)
    assert dict(emulated[0].counts) == {"eager": 2, "captured": 1, "replayed": 3}


def test_emulated_graphs_on_minilm_and_sst2(emulated, minilm_path, sst2_dev):
    """Real model, real data, the CLI's loader: 872 SST-2 sentences length-bucketed by MiniLM's
    tokenizer (token types included) in 28 batches — padded to multiples of 8 in graphs, ν and the
    trace ratio as the eager pass gives them (which test_score holds to the NumPy reference)."""
    from transformers import AutoModel, AutoTokenizer

    from hsvfast.batching import BucketedBatches

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).eval()
    batches = list(BucketedBatches(*sst2_dev, tokenizer, batch_size=32))
    assert "token_type_ids" in batches[0]
    eager = hsvfast.score(model, batches, cuda_graphs=False)
    graphed = hsvfast.score(model, batches, cuda_graphs=True)
    for name in eager.metrics:  # float32 attention over more (masked) keys: equal to float32 rounding
        np.testing.assert_allclose(graphed.metrics[name], eager.metrics[name], rtol=1e-5)
    counts = emulated[0].counts
    assert counts["replayed"] >= 14 and counts["captured"] >= 5, counts


@pytest.mark.parametrize("mode", ["per_class", "balanced", "trace"])
@pytest.mark.parametrize("hold", [False, True])
def test_emulated_graphs_in_every_statistics_mode(mode, hold, emulated, monkeypatch):
    """Per-class staging, balanced mode's batched GEMM (captured with the pooling) and the trace-only
    path; block outputs folded as each block returns (CPU) or held and folded together (GPU)."""
    if hold:
        monkeypatch.setattr(scoring, "_HOLD_BYTES", {"cpu": 1 << 30})
    model = tiny_model("bert").double()
    batches = mixed_length_batches(lengths=(9, 16, 11, 15, 14, 10, 12, 13) * 3)
    kwargs = {"per_class": {}, "balanced": dict(class_counts=_counts(batches)),
              "trace": dict(metrics=["trace_ratio"])}[mode]
    eager = hsvfast.score(model, batches, cuda_graphs=False, **kwargs)
    graphed = hsvfast.score(model, batches, cuda_graphs=True, **kwargs)
    assert_same_statistics(graphed.stats, eager.stats, rtol=1e-9)
    for name in eager.metrics:
        np.testing.assert_allclose(graphed.metrics[name], eager.metrics[name], rtol=1e-9)
    counts = emulated[0].counts
    assert counts["captured"] >= 1 and counts["replayed"] >= 20


def test_emulated_graphs_with_token_types_and_longer_then_shorter_batches(emulated):
    """Sentence pairs (token_type_ids 1 on the second segment) whose lengths within one padded shape go
    down as well as up: what a longer batch left in the static buffers must be padding again (the
    attention mask and the weights matter; the ids and token types are reset too, as a tokenizer pads)."""
    model = tiny_model("bert").double()
    batches = mixed_length_batches(lengths=(16, 12, 15, 9, 16, 10, 13, 11, 14))
    for batch in batches:
        types = torch.zeros_like(batch["input_ids"])
        types[:, batch["input_ids"].shape[1] // 2 :] = 1
        batch["token_type_ids"] = types * batch["attention_mask"]
    eager = hsvfast.score(model, batches, cuda_graphs=False)
    graphed = hsvfast.score(model, batches, cuda_graphs=True)
    assert_same_statistics(graphed.stats, eager.stats, rtol=1e-9)
    assert emulated[0].counts["replayed"] >= 6


@pytest.mark.filterwarnings("ignore:.*have a single example")  # a late class of one example, on purpose
def test_graphs_are_captured_again_when_new_classes_grow_the_statistics(emulated):
    """A class first seen late runs eagerly and grows the accumulators (new addresses): the graph
    captured before is not replayed but captured again."""
    model = tiny_model("bert").double()
    batches = mixed_length_batches(lengths=(8,) * 8, classes=2)
    batches[5]["labels"][3] = 7  # a third class in batch 5 (capacity 2 -> 4)
    eager = hsvfast.score(model, batches, cuda_graphs=False)
    graphed = hsvfast.score(model, batches, cuda_graphs=True)
    assert_same_statistics(graphed.stats, eager.stats, rtol=1e-9)
    assert emulated[0].counts["captured"] == 2  # after batch 1, and again after batch 5


@pytest.mark.parametrize("where", ["emulated", pytest.param("cuda", marks=requires_cuda)])
def test_nan_in_a_replayed_batch_names_that_batch(where, request):
    """The kernel reads the batch index from the static plan: a replayed launch reports its own batch."""
    if where == "emulated":
        request.getfixturevalue("emulated")
    model = tiny_model("bert").double().to("cpu" if where == "emulated" else "cuda")
    batches = mixed_length_batches(lengths=(8,) * 6)  # batch 4 is replayed (so are 3 and 5)
    batches[4]["input_ids"][2, 1] = 3  # random_batches never draws id 3
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[3] = float("nan")
    with pytest.raises(ValueError, match=r"layer 0: non-finite .* batch 4"):
        hsvfast.score(model, batches, cuda_graphs=True)


def _failing_capture(self, graph, run):
    raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_capture_switches_graphs_off_and_scoring_goes_on(emulated, monkeypatch):
    monkeypatch.setattr(ReplayGraphs, "capture", _failing_capture)
    model = tiny_model("llama").double()
    batches = mixed_length_batches()
    eager = hsvfast.score(model, batches, cuda_graphs=False)
    with pytest.warns(UserWarning, match="CUDA graphs switched off .* not permitted"):
        graphed = hsvfast.score(model, batches, cuda_graphs=True)
    assert_same_statistics(graphed.stats, eager.stats, rtol=1e-9)
    assert emulated[0].disabled and emulated[0].counts["replayed"] == 0


def test_a_failed_capture_under_auto_is_only_recorded(emulated, monkeypatch):
    """"auto" (the default) was not asked for graphs: a model that cannot be captured (transformers 4.x reads
    the mask on the host) is scored eagerly without a warning; the report's info says why graphs were off."""
    monkeypatch.setattr(ReplayGraphs, "capture", _failing_capture)
    monkeypatch.setattr(scoring, "HostBoundProbe",
                        lambda device: _fake_probe({"host": 0.0, "arrived": True, "device_over_host": 1.0}))
    model = tiny_model("bert").double()
    batches = mixed_length_batches(lengths=(8,) * 8)
    eager = hsvfast.score(model, batches, cuda_graphs=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = hsvfast.score(model, batches)
    assert_same_statistics(auto.stats, eager.stats, rtol=1e-9)
    info = auto.stats.info["cuda_graphs"]
    assert "not permitted when stream is capturing" in info["off"] and info["replayed"] == 0, info


class _CachedScaleModel(torch.nn.Module):
    """Embedding + linear blocks scaled by a cached tensor that the forward replaces: when an input is longer
    than any before (a cache grown for longer inputs, as rotary caches were), or at every forward
    (``always``). The cache is a registered buffer, or a plain attribute (``plain``: as transformers' speech
    models keep their rotary embeddings). ``moves`` counts the replacements."""

    def __init__(self, always: bool = False, plain: bool = False, hidden: int = 16, depth: int = 3):
        super().__init__()
        self.always, self.plain, self.moves = always, plain, 0
        self.embeddings = torch.nn.Embedding(VOCAB, hidden, dtype=torch.float64)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden, dtype=torch.float64) for _ in range(depth))
        self.reset()

    def reset(self):
        self.keep(torch.ones(1, dtype=torch.float64))
        self.moves = 0

    def keep(self, cache):
        if self.plain:
            self._cache = cache  # a private attribute, as caches often are
        else:
            self.register_buffer("_cache", cache)

    @property
    def cache(self):
        return self._cache

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        tokens = input_ids.shape[1]
        if self.always or tokens > self.cache.shape[0]:
            self.keep(torch.linspace(1.0, 2.0, max(tokens, self.cache.shape[0]), dtype=torch.float64,
                                     device=input_ids.device))
            self.moves += 1
        hidden = self.embeddings(input_ids) * self.cache[:tokens, None]
        for block in self.layers:
            hidden = torch.tanh(block(hidden))
        return hidden


def _conv(**kwargs):
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Conv1d(4, 4, **kwargs))


@pytest.mark.parametrize("conv,reaches", [
    (dict(kernel_size=1), False),                        # no mixing
    (dict(kernel_size=4, padding=3), False),             # causal, cut back after (Mamba, Qwen3-Next)
    (dict(kernel_size=3, padding=4, dilation=2), False),  # causal with dilation
    (dict(kernel_size=9, padding=4), True),              # both sides (ConvBERT)
    (dict(kernel_size=3, padding="same"), True),
    (dict(kernel_size=3, padding=2, dilation=2), True),
])
def test_convolutions_that_reach_later_tokens_are_found(conv, reaches):
    assert graphs.convolves_across_tokens(_conv(**conv)) is reaches


def test_attention_models_and_gpt2s_linear_conv1d_do_not_convolve_across_tokens():
    for kind in ENCODERS + DECODERS:  # GPT-2's transformers.Conv1D is a linear layer
        assert not graphs.convolves_across_tokens(tiny_model(kind))


def test_a_model_that_convolves_across_tokens_runs_in_graphs_of_exact_shapes(emulated):
    """ConvBERT's convolutions see the tokens on both sides, pads included: padded to 8 tokens, its
    float64 ν moved by 9e-4 from the eager pass's. Its graphs keep the batches' own shapes."""
    if not hasattr(transformers, "ConvBertModel"):
        pytest.skip(f"transformers {transformers.__version__} has no ConvBertModel")
    torch.manual_seed(0)
    model = transformers.ConvBertModel(transformers.ConvBertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
        embedding_size=32)).double().eval()
    assert graphs.convolves_across_tokens(model)
    batches = mixed_length_batches(lengths=(5, 7, 5, 7, 6, 5, 7, 6, 5, 7))
    eager = hsvfast.score(model, batches, cuda_graphs=False)
    graphed = hsvfast.score(model, batches, cuda_graphs=True)
    assert_same_statistics(graphed.stats, eager.stats, rtol=1e-9)
    # Eager: batch 0 (first folds) and the first of 7, 5 and 6 tokens; captured: the second of each.
    assert emulated[0].multiple == 1 and dict(emulated[0].counts) == {"eager": 4, "captured": 3, "replayed": 3}


@pytest.mark.parametrize("plain", [False, True], ids=["buffer", "attribute"])
def test_tensors_of_a_model_change_when_one_is_replaced(plain):
    model = _CachedScaleModel(plain=plain)
    watch = graphs.tensors_of(model)
    before = watch()
    assert before == watch() == ((model.cache.data_ptr(), (1,)),)  # parameters are not watched
    model(torch.zeros(2, 5, dtype=torch.long))  # longer than the cache: replaced
    assert watch() == ((model.cache.data_ptr(), (5,)),) != before


def test_a_tensor_without_an_address_is_never_trusted_to_stay():
    model = torch.nn.Linear(2, 2)
    model.register_buffer("sparse", torch.eye(3).to_sparse())
    watch = graphs.tensors_of(model)
    assert watch() != watch()  # a sparse tensor has no data pointer: its place is unknowable


@pytest.mark.parametrize("plain", [False, True], ids=["buffer", "attribute"])
def test_graphs_are_captured_again_when_the_model_replaces_a_tensor(plain, emulated):
    """A longer batch grows the model's cache (a new tensor) in an eager forward: the graph of the shorter
    shape, captured before, would read the old one; it is captured again instead (ReplayGraphs checks that
    no replay reads a moved tensor)."""
    model = _CachedScaleModel(plain=plain)
    batches = mixed_length_batches(lengths=(8, 8, 8, 16, 16, 8, 8, 16, 8))
    eager = hsvfast.score(model, batches, blocks=model.layers, pooling="mean_all", cuda_graphs=False)
    model.reset()
    graphed = hsvfast.score(model, batches, blocks=model.layers, pooling="mean_all", cuda_graphs=True)
    assert_same_statistics(graphed.stats, eager.stats, rtol=1e-12)
    assert model.moves == 2  # the first batch (8 tokens), the first of 16 (batch 3)
    # Eager: batch 0 (first folds), 1 and 3 (first of 8 and of 16 tokens; 3 grows the cache). Captured: 2, 4,
    # and 5 (8 tokens again: the cache moved after the first capture). Replayed: 6-8.
    assert dict(emulated[0].counts) == {"eager": 3, "captured": 3, "replayed": 3}
    assert emulated[0].model_moves == 1 and not emulated[0].disabled


def test_graphs_switch_off_for_a_model_that_replaces_a_tensor_in_every_forward(emulated):
    model = _CachedScaleModel(always=True)
    batches = mixed_length_batches(lengths=(8,) * 16)
    eager = hsvfast.score(model, batches, blocks=model.layers, pooling="mean_all", cuda_graphs=False)
    graphed = hsvfast.score(model, batches, blocks=model.layers, pooling="mean_all", cuda_graphs=True)
    assert_same_statistics(graphed.stats, eager.stats, rtol=1e-12)
    assert "replaces its tensors" in graphed.stats.info["cuda_graphs"]["off"]
    assert emulated[0].model_moves == graphs.MAX_MODEL_MOVES + 1


@pytest.mark.parametrize("kind", ENCODERS + DECODERS)
def test_forwards_read_no_device_value_on_the_host_while_capturing(kind, monkeypatch):
    """A capture fails on any host read of a device value (``.item()``, ``if tensor:``). The CPU's proxy:
    the forward on the meta device, where such reads raise, with transformers told that a capture is
    under way (it then skips its data-dependent shortcuts, like dropping an all-ones mask, which read
    the mask on the host — without that flag all but DeBERTa's forward fail here)."""
    import transformers.utils.import_utils as import_utils

    if not hasattr(import_utils, "is_cuda_stream_capturing"):
        pytest.skip("this transformers does not check for a CUDA graph capture: graphs switch off for most models")
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers") and hasattr(module, "is_cuda_stream_capturing"):
            monkeypatch.setattr(module, "is_cuda_stream_capturing", lambda: True)
    model = tiny_model(kind).to("meta")
    batch = mixed_length_batches(lengths=(9,))[0]
    with torch.inference_mode():
        model(input_ids=batch["input_ids"].to("meta"), attention_mask=batch["attention_mask"].to("meta"))


class _FakeEvent:
    """A CUDA event whose elapsed time to another is ``device_over_host`` × the host time the probe
    measured between them (the fake clock advances 10 ms per reading; the probe reads it twice between
    its two events and counts one step as the host's time)."""

    def __init__(self, timeline):
        self.timeline = timeline

    def record(self, stream=None):
        self.at = self.timeline["host"]

    def query(self):
        return self.timeline["arrived"]

    def elapsed_time(self, end):  # milliseconds, as torch.cuda.Event gives them
        return (end.at - self.at) / 2 * 1e3 * self.timeline["device_over_host"]


def _fake_probe(timeline, **kwargs):
    def clock():
        timeline["host"] += 0.010  # every reading 10 ms later
        return timeline["host"]

    def synchronize():
        timeline.setdefault("synchronized", []).append(timeline["host"])

    return graphs.HostBoundProbe(new_event=lambda: _FakeEvent(timeline), clock=clock, synchronize=synchronize,
                                 **kwargs)


def test_probe_finds_a_host_bound_forward_only_once_its_timings_arrived():
    timeline = {"host": 0.0, "arrived": False, "device_over_host": 1.02}
    probe = _fake_probe(timeline, batches=3, skip=1)
    ran = []
    for i in range(5):
        probe.time(lambda: ran.append(i))
    assert ran == [0, 1, 2, 3, 4] and len(probe.pending) == 3  # batch 0 skipped, 4 not needed
    # The device was idle when each timed batch began (and only then: the other batches never wait).
    assert timeline["synchronized"] == [0.0, 0.02, 0.04]
    assert [start.at for start, _, _ in probe.pending] == [0.0, 0.02, 0.04]
    assert probe.decide() is None  # still in flight: nothing waits for the device
    timeline["arrived"] = True
    assert probe.decide() is True and probe.ratios == pytest.approx([1.02] * 3)
    device_bound = _fake_probe({"host": 0.0, "arrived": True, "device_over_host": 1.6}, batches=3, skip=0)
    for _ in range(3):
        device_bound.time(lambda: None)
    assert device_bound.decide() is False


@pytest.mark.parametrize("device_over_host", [1.0, 1.8], ids=["host_bound", "device_bound"])
@pytest.mark.parametrize("asked", [{"cuda_graphs": "auto"}, {}], ids=["auto", "default"])
def test_auto_uses_graphs_only_for_a_host_bound_forward(device_over_host, asked, emulated, monkeypatch):
    timeline = {"host": 0.0, "arrived": True, "device_over_host": device_over_host}
    monkeypatch.setattr(scoring, "HostBoundProbe", lambda device: _fake_probe(timeline))
    model = tiny_model("bert").double()
    batches = mixed_length_batches(lengths=(8,) * 12)
    eager = hsvfast.score(model, batches, cuda_graphs=False)
    auto = hsvfast.score(model, batches, **asked)  # "auto" is the default
    assert_same_statistics(auto.stats, eager.stats, rtol=1e-9)
    counts = emulated[0].counts
    if device_over_host < 1.1:  # batches 1-4 timed (0 skipped), decided at batch 5, captured, the rest replayed
        assert counts["captured"] == 1 and counts["replayed"] == 6, counts
        assert auto.stats.info["cuda_graphs"] == {"replayed": 6, "captured": 1, "eager": 5, "host_bound": True}
    else:
        assert counts["captured"] == 0 and "bound by the device" in emulated[0].disabled
        assert auto.stats.info["cuda_graphs"]["host_bound"] is False


def test_cuda_graphs_argument_is_checked():
    with pytest.raises(ValueError, match="cuda_graphs must be True, False or 'auto'"):
        hsvfast.score(tiny_model("bert"), random_batches(), cuda_graphs="always")
    for asked in ({"cuda_graphs": "auto"}, {}):  # "auto" (the default) on the CPU: the eager pass, no graph info
        auto = hsvfast.score(tiny_model("bert"), random_batches(), device="cpu", **asked)
        assert auto.num_examples == 48 and "cuda_graphs" not in auto.stats.info


def test_padding_never_passes_the_models_longest_input():
    stub = graphs.ForwardGraphs.__new__(graphs.ForwardGraphs)
    stub.multiple, stub.max_tokens = 8, 61
    assert [stub.padded_tokens(t, masked=True) for t in (1, 8, 9, 57, 60, 61)] == [8, 8, 16, 61, 61, 61]
    assert stub.padded_tokens(9, masked=False) == 9  # without an attention mask padding would be attended


def test_cuda_graphs_need_a_cuda_device():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        hsvfast.score(tiny_model("bert"), random_batches(), cuda_graphs=True)


# ---------------------------------------------------------------- real CUDA graphs
def _score_with_graphs(model, batches, **kwargs):
    """score(cuda_graphs=True), how its batches ran (``stats.info["cuda_graphs"]``) and its graph warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = hsvfast.score(model, batches, cuda_graphs=True, **kwargs)
    return report, report.stats.info["cuda_graphs"], [str(w.message) for w in caught if "CUDA graphs" in str(w.message)]


#: Architectures whose forward must be capturable (the others may switch graphs off, with a warning).
CAPTURABLE = ("bert", "roberta", "distilbert", "gpt2", "llama", "qwen2", "mistral")


@requires_cuda
@pytest.mark.parametrize("kind", ENCODERS + DECODERS)
@pytest.mark.parametrize("mode", ["per_class", "balanced"])
def test_cuda_graphs_give_the_eager_statistics(kind, mode):
    model = tiny_model(kind).cuda()
    batches = mixed_length_batches(lengths=(9, 16, 11, 15, 14, 10, 12, 13) * 2)
    kwargs = dict(class_counts=_counts(batches)) if mode == "balanced" else {}
    eager = hsvfast.score(model, batches, cuda_graphs=False, autocast=False, **kwargs)
    graphed, used, warned = _score_with_graphs(model, batches, autocast=False, **kwargs)
    # Padded to 16 tokens, float32 attention sums in another order: equal to float32 rounding.
    assert_same_statistics(graphed.stats, eager.stats, rtol=1e-4)
    if kind in CAPTURABLE or not warned:
        assert not warned and used["replayed"] >= 10, (warned, used)


@requires_cuda
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_cuda_graphs_under_bf16_autocast(kind):
    """The default on CUDA for a float32 model: captured with autocast's cast cache off."""
    model = tiny_model(kind).cuda()
    batches = mixed_length_batches(lengths=(9, 16, 11, 15, 14, 10, 12, 13) * 2)
    eager = hsvfast.score(model, batches, cuda_graphs=False)
    graphed, used, warned = _score_with_graphs(model, batches)
    assert not warned and used["replayed"] >= 10
    for name in eager.metrics:  # bf16 hidden states of differently padded attention
        np.testing.assert_allclose(graphed.metrics[name], eager.metrics[name], rtol=3e-2)


@requires_cuda
def test_the_default_on_cuda_times_the_forward_and_gives_the_eager_statistics():
    """score() without cuda_graphs on a GPU is "auto": a few eager batches are timed, then graphs run if the
    forward is bound by the host (a tiny BERT's is); either way the statistics are the eager pass's."""
    model = tiny_model("bert").cuda()
    batches = mixed_length_batches(lengths=(9, 16, 11, 15, 14, 10, 12, 13) * 2)
    eager = hsvfast.score(model, batches, autocast=False, cuda_graphs=False)
    default = hsvfast.score(model, batches, autocast=False)
    info = default.stats.info["cuda_graphs"]
    assert info["host_bound"] is not None and info["eager"] >= 5, info  # the probe decided, after 1 + 4 batches
    assert_same_statistics(default.stats, eager.stats, rtol=1e-4)


class _DeviceHeavyModel(torch.nn.Module):
    """Embedding + linear blocks, each keeping the device busy ``cycles`` (``torch.cuda._sleep``) first,
    then launching ``launches`` tiny kernels more."""

    def __init__(self, cycles: int, depth: int = 3, hidden: int = 32, launches: int = 0):
        super().__init__()
        self.cycles, self.launches = cycles, launches
        self.embeddings = torch.nn.Embedding(VOCAB, hidden)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(depth))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.embeddings(input_ids)
        for block in self.layers:
            if self.cycles:
                torch.cuda._sleep(self.cycles)
            for _ in range(self.launches):
                hidden = hidden * 1.0
            hidden = block(hidden)
        return hidden


@requires_cuda
@pytest.mark.parametrize("busy_ms, depth, launches, slow_loader",
                         [(0.0, 3, 0, True), (5.0, 3, 0, True), (2.0, 8, 200, False)],
                         ids=["host_bound", "device_bound", "device_bound_host_ahead"])
def test_auto_probe_on_the_device(busy_ms, depth, launches, slow_loader):
    """A forward of tiny kernels keeps the device waiting for the host: "auto" uses graphs. Blocks that
    keep the device busy 5 ms each (while the host launches them in microseconds): it does not. Nor
    when the host, launching ~1,600 kernels per batch to a device busy 16 ms per batch, runs ahead
    until the launch queue is full and then waits for it (gpu_check run 5's Llama ~1B)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from host_overhead import sleep_cycles

    model = _DeviceHeavyModel(sleep_cycles(busy_ms) if busy_ms else 0, depth=depth, launches=launches).cuda()
    batches = mixed_length_batches(lengths=(8,) * 12)

    def loader():  # a loader slower than the device: the timings arrive before the probe is asked
        for batch in batches:
            time.sleep(0.05)
            yield batch

    report = hsvfast.score(model, loader() if slow_loader else batches, blocks=model.layers, pooling="mean_all",
                           cuda_graphs="auto")
    info = report.stats.info["cuda_graphs"]
    if busy_ms:
        assert info["host_bound"] is False and info["replayed"] == 0, info
    else:
        assert info["host_bound"] is True and info["replayed"] >= 4, info
