"""End-to-end timing of hsvfast.score against its baselines, measured in one run on the same batches.

    python benchmarks/end_to_end.py                      # MiniLM, 4096 SST-2 train sentences, CPU
    python benchmarks/end_to_end.py --device cuda --dtype bfloat16 --model bert-large-random

Prints one Markdown table: median time over rounds (methods interleaved, order rotated each round), ratio to the floor
(a bare forward of the model truncated to the deepest scored layer), examples/s, tokens/s and
peak memory. Ratios, not absolute times, are what to compare across machines.
"""
from __future__ import annotations

import argparse
import collections
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hsvfast  # noqa: E402
from baselines.common import model_inputs, on_device  # noqa: E402
from baselines.floor import bare_forward  # noqa: E402
from baselines.hand_written import hand_written  # noqa: E402
from baselines.paper_procedure import paper_end_to_end, paper_procedure  # noqa: E402
from hsvfast.batching import BucketedBatches  # noqa: E402
from hsvfast.metrics import layer_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load_model(name: str, device: str, dtype: torch.dtype):
    from transformers import AutoModel, AutoTokenizer

    from hsvfast.cli import CommandError, default_model_path

    if name == "minilm":
        path = default_model_path()
        return AutoModel.from_pretrained(path, dtype=dtype).to(device).eval(), AutoTokenizer.from_pretrained(path)
    import transformers as tf

    try:  # MiniLM's tokenizer stands in for any (ids < 30522); --synthetic makes its own
        tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    except CommandError:  # not installed (the GPU machine)
        tokenizer = None
    if name == "bert-large-random":
        config = tf.BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
        make = tf.BertModel
    elif name == "llama-1b-random":
        config = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                num_key_value_heads=8, intermediate_size=8192)
        make = tf.LlamaModel
    else:
        raise SystemExit(f"unknown model {name}")
    with torch.device(device):  # random init on the device: a minute less for 1B parameters than on the host
        model = make(config)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def read_sst2(path: Path, n: int):
    lines = path.read_text(encoding="utf-8").splitlines()[1 : n + 1]
    rows = [line.split("\t") for line in lines]
    return [r[1] for r in rows], [int(r[0]) for r in rows]


def synthetic_corpus(n: int, seed: int = 0):
    """``n`` labelled sentences of random words, 2..64 words each (4..66 tokens with [CLS]/[SEP], like SST-2),
    and a BERT-style fast tokenizer (normaliser, pre-tokenizer, WordPiece, [CLS]/[SEP]) that knows every
    word: text → report on a machine without data files or downloaded tokenizers."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = sorted({"".join(rng.choice(letters, size=rng.integers(3, 11))) for _ in range(20000)})
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(special + words + ["##" + c for c in letters])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    lengths = rng.integers(2, 65, size=n)
    picks = rng.integers(0, len(words), size=int(lengths.sum()))
    ends = np.cumsum(lengths)
    texts = [" ".join(words[i] for i in picks[end - k : end]) for end, k in zip(ends, lengths)]
    return texts, rng.integers(0, 2, size=n).tolist(), tokenizer


def synthetic_batches(n: int, batch_size: int, seed: int = 0):
    """Length-sorted batches of random ids ([CLS]=101 … [SEP]=102), lengths 4..66 like SST-2 sentences."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 67, (n,), generator=g).sort().values
    labels = torch.randint(0, 2, (n,), generator=g)
    batches, real, padded = [], 0, 0
    for start in range(0, n, batch_size):
        rows = lengths[start : start + batch_size]
        width = int(rows.max())
        ids = torch.randint(1000, 30000, (len(rows), width), generator=g)
        positions = torch.arange(width).expand(len(rows), width)
        attention = (positions < rows.unsqueeze(1)).long()
        special = ((positions == 0) | (positions == rows.unsqueeze(1) - 1) | (attention == 0)).long()
        ids[:, 0] = 101
        ids[positions == rows.unsqueeze(1) - 1] = 102
        ids[attention == 0] = 0
        batches.append({"input_ids": ids, "attention_mask": attention, "special_tokens_mask": special,
                        "labels": labels[start : start + batch_size]})
        real, padded = real + int(rows.sum()), padded + ids.numel()
    return batches, real, real / padded


def warm_up(methods, *batch_lists) -> None:
    """Run each method once on the first two batches of each list (the lists are cut in place, then restored)."""
    for fn in methods:
        saved = [list(batches) for batches in batch_lists]
        for batches, kept in zip(batch_lists, saved):
            batches[:] = kept[:2]
        try:
            fn()
        finally:
            for batches, kept in zip(batch_lists, saved):
                batches[:] = kept


class Peak:
    """Peak memory of a block: GPU allocator peak on CUDA, resident-set high-water mark on the CPU."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._rss()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = self._rss() - self.base

    @staticmethod
    def _rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
        return 0


def seconds(fn, device: str):
    """Wall seconds of ``fn()`` with the device idle before and after, and its result."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def timed(fn, device):
    """:func:`seconds` and the peak memory of ``fn()``."""
    with Peak(device) as peak:
        elapsed, result = seconds(fn, device)
    return elapsed, peak.peak, result


def last_hidden_is_block_output(model, batch) -> bool:
    """Whether output_hidden_states[-1] is the last block's output (False after a final norm)."""
    blocks = hsvfast.find_blocks(model)
    seen = {}
    handle = blocks[len(blocks) - 1].register_forward_hook(lambda m, a, out: seen.update(out=out))
    try:
        with torch.inference_mode():
            states = model(**model_inputs(on_device(batch, model)), output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    return torch.equal(hsvfast.layers.block_hidden_states(seen["out"]), states[-1])


def launch_per_layer(fn):
    """``fn`` with hsvfast folding each block's output as it returns (no block outputs held per batch)."""
    def run():
        saved = hsvfast.scoring._HOLD_BYTES
        hsvfast.scoring._HOLD_BYTES = {}
        try:
            return fn()
        finally:
            hsvfast.scoring._HOLD_BYTES = saved
    return run


def profile(fn, device: str, baseline=None, batches: int = 1) -> None:
    """Where the time of ``fn`` goes, by kernel (GPU) or operator (CPU): profile before optimising.

    With ``baseline`` (the floor on the same batches) also prints both totals, so the device time
    hsvfast adds is told apart from time the device waits for the host.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    from torch.autograd import DeviceType

    def busy(event) -> bool:  # device time of kernels only (operator rows repeat their kernels' time)
        return device != "cuda" or event.device_type == DeviceType.CUDA

    totals = {}
    with torch_profile(activities=activities):  # the profiler's own start-up, kept out of the totals
        (baseline or fn)()
    for name, run in (("floor", baseline), ("hsvfast.score", fn)):
        if run is None:
            continue
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        with torch_profile(activities=activities) as prof:
            run()
            if device == "cuda":
                torch.cuda.synchronize()
        events = prof.key_averages()
        totals[name] = (time.perf_counter() - began, sum(getattr(e, key) for e in events if busy(e)) / 1e6)
    print("\n" + events.table(sort_by=key, row_limit=14, max_name_column_width=60))
    if device == "cuda":  # hsvfast's own kernels: the pooling kernel and the float64 Gram updates
        own = [e for e in events if busy(e) and re.search(r"pool_fold|f64|dgemm|dmma|d884|d1688|tensorop_d", e.key, re.I)]
        for e in sorted(own, key=lambda e: -getattr(e, key)):
            print(f"  hsvfast kernel {e.key[:70]}: {getattr(e, key) / 1e3:.2f} ms in {e.count} launches")
    for name, (wall, device_s) in totals.items():
        print(f"profiled {name}: {wall * 1e3:.1f} ms wall (profiler on), {device_s * 1e3:.1f} ms "
              f"{'device' if device == 'cuda' else 'CPU'} time = {device_s / batches * 1e3:.2f} ms per batch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="minilm | bert-large-random | llama-1b-random")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sst2" / "train.tsv"))
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slow-rounds", type=int, default=None,
                        help="rounds of the slow baselines (hand-written, paper's procedure); default --rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--synthetic", action="store_true",
                        help="generated sentences (SST-2-like lengths) and a generated BERT-style tokenizer instead "
                             "of the data file and the model's tokenizer")
    parser.add_argument("--skip", default="",
                        help="comma-separated methods to skip (paper, hand, hsvfast_e2e, paper_e2e, graphs)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile hsvfast.score on N batches spread over the lengths; print its top kernels")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    args.slow_rounds = args.rounds if args.slow_rounds is None else min(args.slow_rounds, args.rounds)
    skip = set(filter(None, args.skip.split(",")))

    model, tokenizer = load_model(args.model, args.device, dtype)
    if args.synthetic:
        synthetic_texts, synthetic_labels, tokenizer = synthetic_corpus(args.examples)
        corpus = lambda: (synthetic_texts, synthetic_labels)  # noqa: E731
    else:
        corpus = lambda: read_sst2(Path(args.data), args.examples)  # noqa: E731
    bucketed = BucketedBatches(*corpus(), tokenizer, batch_size=args.batch_size)
    batches = list(bucketed)
    real_tokens, efficiency = bucketed.padding.real_tokens, bucketed.padding.efficiency
    if args.device == "cuda":  # host batches, pinned as DataLoader(pin_memory=True) yields them
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    layers = list(range(len(hsvfast.find_blocks(model))))
    deepest = layers[-1]

    graphs = args.device == "cuda" and "graphs" not in skip
    # On CUDA the default is cuda_graphs="auto" (graphs where a few timed batches show the forward is bound by
    # the host); the eager pass is timed beside it, and the variants below are eager, as in earlier runs.
    eager = {"cuda_graphs": False} if args.device == "cuda" else {}
    default = {} if graphs or args.device != "cuda" else eager  # graphs left out: the default runs eagerly
    graph_runs = {}  # how the last timed run of each graph mode ran (replayed / captured / eager, the verdict)

    def ours(mode_name=None, **kwargs):
        def run():
            report = hsvfast.score(model, batches, layers=layers, **kwargs)
            if mode_name and "cuda_graphs" in report.stats.info:
                graph_runs[mode_name] = report.stats.info["cuda_graphs"]
            return report.metrics["variability" if "metrics" not in kwargs else kwargs["metrics"][0]]
        return run

    methods = {
        "floor (bare truncated forward)": lambda: bare_forward(model, batches, deepest),
        # The same floor again, interleaved like the others: its ratio is the run's noise.
        "floor again (noise check)": lambda: bare_forward(model, batches, deepest),
        "hand-written (output_hidden_states)": lambda: hand_written(model, batches, layers),
        "paper's procedure (same batches)": lambda: paper_procedure(model, batches, layers),
        "hsvfast.score": ours("default (auto)", **default),
        # No second moments: what the pooling kernel and the hooks cost without the float64 Gram updates.
        "hsvfast.score, trace ratio only": ours(metrics=["trace_ratio"], **eager),
    }
    if args.device == "cuda":
        methods["hsvfast.score, eager (cuda_graphs=False)"] = ours(**eager)
        # The launch path before block outputs were held, in the same run: one kernel launch per layer.
        methods["hsvfast.score, eager, a launch per layer"] = launch_per_layer(ours(**eager))
        # The mode many-class tasks run in (one class-balanced matrix per layer, updated every batch);
        # the counts must be those of the batches scored, and warm_up runs every method on two batches only.
        def label_counts(of):
            return collections.Counter(label for b in of for label in b["labels"].tolist())
        all_counts, all_batches = label_counts(batches), len(batches)

        def with_class_counts():
            counts = all_counts if len(batches) == all_batches else label_counts(batches)
            return ours(class_counts=counts, **eager)()
        methods["hsvfast.score, eager, class_counts given"] = with_class_counts
    if graphs:
        # The forward (and the pooling) replayed from a CUDA graph per padded batch shape (hsvfast.graphs).
        methods["hsvfast.score, CUDA graphs"] = ours(True, cuda_graphs=True)
    if "hand" in skip:
        methods.pop("hand-written (output_hidden_states)")
    if "paper" in skip:
        methods.pop("paper's procedure (same batches)")
    warm_up(methods.values(), batches)

    def hsvfast_e2e(**options):  # from the texts (read from the file, or generated) to the report, as the CLI does it
        loader = BucketedBatches(*corpus(), tokenizer, batch_size=args.batch_size, pin_memory=args.device == "cuda")
        return hsvfast.score(model, loader, device=args.device, **options).metrics["variability"]

    source = "generated text" if args.synthetic else "file"
    ours_e2e, paper_e2e = f"hsvfast end to end ({source} → report)", f"paper end to end ({source} → report)"
    # Tokenising included, against the floor on ready batches, in the rounds like the others (no warm-up
    # of their own: the scoring path is warm, and their first tokenising is part of what they cost).
    if "hsvfast_e2e" not in skip:
        methods[ours_e2e] = lambda: hsvfast_e2e(**default)
        if graphs:
            methods[f"{ours_e2e[:-1]}, eager)"] = lambda: hsvfast_e2e(**eager)
    times = {name: [] for name in methods}
    peaks, results = {}, {}
    names = list(methods)
    slow = {"hand-written (output_hidden_states)", "paper's procedure (same batches)"}
    for round_index in range(args.rounds):
        shift = round_index % len(names)  # rotate the order: no method always runs first (or after the same one)
        for name in names[shift:] + names[:shift]:
            if name in slow and round_index >= args.slow_rounds:
                continue
            elapsed, peak, result = timed(methods[name], args.device)
            times[name].append((round_index, elapsed))
            peaks[name] = max(peaks.get(name, 0), peak)
            results[name] = result

    rows = {name: (statistics.median(t for _, t in samples), peaks[name]) for name, samples in times.items()}
    # Each method against the floor of its own round: slow drift of the machine's speed
    # cancels; the median over rounds is the paired ratio.
    floors = dict(times["floor (bare truncated forward)"])
    paired = {name: statistics.median(t / floors[r] for r, t in samples) for name, samples in times.items()}

    if "paper_e2e" not in skip and args.device == "cpu":  # once, after the rounds: it takes minutes
        elapsed, peak, result = timed(lambda: paper_end_to_end(model, tokenizer, *corpus(), layers), args.device)
        rows[paper_e2e] = (elapsed, peak)

    floor = rows["floor (bare truncated forward)"][0]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\nmodel={args.model} dtype={args.dtype} device={device_name} backend={hsvfast.backend(args.device)} "
          f"torch={torch.__version__} "
          f"threads={torch.get_num_threads()} examples={args.examples} batch={args.batch_size} "
          f"layers={len(layers)} padding efficiency={efficiency:.3f} rounds={args.rounds} "
          f"(slow baselines: {args.slow_rounds})\n")
    print("| method | median s | × floor | × floor, paired by round | examples/s | tokens/s | peak MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (seconds, peak) in rows.items():
        pair = f"{paired[name]:.3f}" if name in paired else ""
        print(f"| {name} | {seconds:.3f} | {seconds / floor:.3f} | {pair} | {args.examples / seconds:,.0f} | "
              f"{real_tokens / seconds:,.0f} | {peak / 2**20:,.0f} |")
    if args.profile:
        # Batches spread over the length range: the first ones alone are the shortest.
        sample = batches[:: max(1, len(batches) // args.profile)][: args.profile]
        profile(lambda: hsvfast.score(model, sample, layers=layers, **eager), args.device,
                baseline=lambda: bare_forward(model, sample, deepest), batches=len(sample))
        # Against the device time per batch above: a floor whose wall time per batch is larger waits on the host.
        print(f"floor, unprofiled: {floor / len(batches) * 1e3:.2f} ms wall per batch (all batches)")
    finalise = {"all layers at once (report_from)": [], "layer by layer (for comparison)": []}
    stats = hsvfast.score(model, batches[:8], layers=layers, **eager).stats
    for _ in range(5):
        for name, fn in zip(finalise, (lambda: hsvfast.report_from(stats),
                                       lambda: [layer_metrics(stats.class_moments(p)) for p in range(len(layers))])):
            finalise[name].append(timed(fn, args.device)[0])
    print()
    for name, samples in finalise.items():
        print(f"finalising the metrics of {len(layers)} layers, {name}: {statistics.median(samples) * 1e3:.1f} ms "
              f"(median of 5; {statistics.median(samples) / rows['hsvfast.score'][0]:.1%} of hsvfast.score above)")
    if "hand-written (output_hidden_states)" in results:
        ours = np.array(results["hsvfast.score"])
        theirs = np.array(results["hand-written (output_hidden_states)"])
        # Decoder models (Llama, GPT-2 …) return their last hidden state after the final norm, not the block's
        # output that hsvfast scores: compare the layers where output_hidden_states holds the block output.
        same = layers if last_hidden_is_block_output(model, batches[0]) else layers[:-1]
        difference = np.max(np.abs(ours[same] - theirs[same]) / np.abs(theirs[same]))
        print(f"max relative difference of ν, hsvfast vs hand-written (layers {same[0]}–{same[-1]}): {difference:.2e}")
        if difference > 1e-2:
            print("  hand-written ν per layer (a d×d pinv of the rank-(C−1) Σ_b; it inverts round-off when a few "
                  f"dimensions carry huge means): {np.array2string(theirs, precision=3)}\n"
                  f"  hsvfast ν per layer (exact rank-(C−1) read-out): {np.array2string(ours, precision=3)}")
    for mode, info in graph_runs.items():
        print(f"cuda_graphs={mode!r}: {info}")
    eager_name = "hsvfast.score, eager (cuda_graphs=False)"
    for name in ("hsvfast.score, CUDA graphs", "hsvfast.score"):  # padded to 8 tokens, attention sums in another order
        if name in results and eager_name in results:
            theirs, mine = np.array(results[eager_name]), np.array(results[name])
            print(f"max relative difference of ν, {name} vs eager: {np.max(np.abs(mine - theirs) / np.abs(theirs)):.2e}")
    paper = "paper's procedure (same batches)"
    if paper in rows:
        print(f"hsvfast speed-up over the paper's procedure on the same batches: {rows[paper][0] / rows['hsvfast.score'][0]:.2f}× "
              f"(target ≥ {0.9 * (len(layers) + 1) / 2:.2f}×)")
    if paper_e2e in rows and ours_e2e in rows:
        e2e = rows[paper_e2e][0] / rows[ours_e2e][0]
        print(f"end to end from the data file: {e2e:.2f}× (target ≥ {(len(layers) + 1) / 2:.2f}×)")


if __name__ == "__main__":
    main()
