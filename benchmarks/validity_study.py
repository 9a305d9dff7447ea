"""Which metric predicts the best layer? A validity study on real data with MiniLM.

    python benchmarks/validity_study.py [--train 2000 --test 1000] [--out ../docs/validity.md]

For each task: pooled features of every layer (mean over non-special tokens, as scored), every
hsvfast metric per layer on the training sample, and the ground truth — a linear probe (L2
multinomial logistic regression, full-batch L-BFGS on standardised features) trained on the
training sample and evaluated on held-out examples (accuracy; MCC for CoLA). Reports Spearman
correlations between each metric (sign-adjusted: +1 = ranks layers as the probe does) and the probe,
how often each metric's best layer is the probe's best (or within 1 point of it), the trivial
baselines "top layer" and "middle layer", and robustness of ν / nc1 to sample size and imbalance.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch

from hsvfast.data import read_labelled_text
from hsvfast.metrics import LOWER_IS_BETTER, metric

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
METRICS = list(LOWER_IS_BETTER)
# name: (train file, test file or None (split one file), read options)
TASKS = {
    "sst2": ("sst2/train.tsv", "sst2/dev.tsv", {}),
    "cola": ("cola/train.tsv", "cola/dev.tsv", {"text_column": 3, "label_column": 1}),
    "mrpc": ("mrpc/train.tsv", "mrpc/dev.tsv", {}),
    "rte": ("rte/train.tsv", "rte/dev.tsv", {}),
    "qnli": ("qnli/dev.tsv", None, {}),
    "ag_news": ("ag_news/test.csv", None, {"text_column": "description"}),
    "banking77": ("banking77/train.csv", "banking77/test.csv", {}),
    "emotion": ("tweet_eval/emotion_train.csv", "tweet_eval/emotion_test.csv", {}),
    "emoji": ("tweet_eval/emoji_train.csv", "tweet_eval/emoji_test.csv", {}),
    "davidson": ("davidson_hate_offensive/labeled_data.csv", None, {}),
}


def sample(table, n, rng):
    idx = rng.permutation(len(table.texts))[:n]
    pairs = list(table.pairs[idx]) if table.pairs is not None else None  # TextColumns take positions as numpy
    return list(table.texts[idx]), pairs, [table.labels[i] for i in idx]


def load_task(name, n_train, n_test, seed=0):
    train_file, test_file, options = TASKS[name]
    rng = np.random.default_rng(seed)
    train = read_labelled_text(DATA / train_file, **options)
    if test_file is None:  # one file: split it
        idx = rng.permutation(len(train.texts))
        cut = min(n_train, int(0.6 * len(idx)))
        pick = lambda ids: (list(train.texts[ids]), list(train.pairs[ids]) if train.pairs else None,  # noqa: E731
                            [train.labels[i] for i in ids])
        return pick(idx[:cut]), pick(idx[cut : cut + n_test])
    test = read_labelled_text(DATA / test_file, **options)
    return sample(train, n_train, rng), sample(test, n_test, rng)


@torch.inference_mode()
def pooled_features(model, tokenizer, texts, pairs, batch_size=64):
    """(layers, N, d) float64: mean over attended non-special tokens of every block's output."""
    order = np.argsort([len(t) + (len(pairs[i]) if pairs else 0) for i, t in enumerate(texts)])
    out = None
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        enc = tokenizer([texts[i] for i in rows], [pairs[i] for i in rows] if pairs else None, padding=True,
                        truncation=True, max_length=128, return_tensors="pt", return_special_tokens_mask=True)
        states = model(**{k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc},
                       output_hidden_states=True).hidden_states[1:]
        weights = (enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()).double()
        weights = weights / weights.sum(1, keepdim=True).clamp(min=1)
        pooled = torch.stack([torch.einsum("bt,btd->bd", weights, s.double()) for s in states])
        if out is None:
            out = torch.empty(len(states), len(texts), pooled.shape[-1], dtype=torch.float64)
        out[:, torch.as_tensor(rows)] = pooled
    return out.numpy()


def probe(train_x, train_y, test_x, test_y, weight_decay=1e-3, iterations=200):
    classes = {c: i for i, c in enumerate(sorted(set(train_y), key=repr))}
    keep = np.array([y in classes for y in test_y])
    mean, std = train_x.mean(0), train_x.std(0) + 1e-8
    x = torch.as_tensor((train_x - mean) / std)
    y = torch.as_tensor([classes[c] for c in train_y])
    xt = torch.as_tensor((test_x[keep] - mean) / std)
    yt = np.array([classes[c] for c in np.asarray(test_y, dtype=object)[keep]])
    w = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    predicted = (xt @ w + b).argmax(1).detach().numpy()
    accuracy = float((predicted == yt).mean())
    return accuracy, matthews(predicted, yt)


def matthews(p, t):
    from hsvfast.training import _matthews

    return _matthews(p, t)


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--robustness-max", type=int, default=100000, help="cap on the SST-2 train pool")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "validity.md"))
    args = parser.parse_args()
    from transformers import AutoModel, AutoTokenizer

    from hsvfast.cli import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    model = AutoModel.from_pretrained(default_model_path()).eval()
    lines = ["# Validity study: which metric finds the layer a linear probe prefers?", "",
             f"all-MiniLM-L6-v2, {args.train} training / {args.test} held-out examples per task (fewer where the "
             "data is smaller), mean pooling over non-special tokens. Produced by `python "
             "benchmarks/validity_study.py`; metrics on the training sample, probe (L2 logistic regression) "
             "trained there and evaluated held out. ρ = Spearman correlation across the 6 layers between the "
             "metric (sign-adjusted so +1 means it ranks layers as the probe does) and probe accuracy "
             "(MCC for CoLA). 'hit' = the metric's best layer is the probe's best or within 1 point of it.", ""]
    summary = {m: {"rho": [], "hit": []} for m in METRICS + ["top layer", "middle layer"]}
    curves = {}
    for task in args.tasks.split(","):
        (tr_x, tr_p, tr_y), (te_x, te_p, te_y) = load_task(task, args.train, args.test)
        train_features = pooled_features(model, tokenizer, tr_x, tr_p)
        test_features = pooled_features(model, tokenizer, te_x, te_p)
        layers = list(range(train_features.shape[0]))
        truth_key = 1 if task == "cola" else 0
        probes = [probe(train_features[k], tr_y, test_features[k], te_y) for k in layers]
        truth = np.array([p[truth_key] for p in probes])
        best_truth = truth.max()
        values = {m: np.array([metric(m, train_features[k], tr_y) for k in layers]) for m in METRICS}
        curves[task] = (truth, values)
        lines += [f"## {task} ({len(tr_y)} train / {len(te_y)} held out, {len(set(tr_y))} classes)", "",
                  "| layer | probe " + ("MCC" if truth_key else "acc") + " | " + " | ".join(METRICS) + " |",
                  "|---:|---:|" + "---:|" * len(METRICS)]
        for k in layers:
            lines.append(f"| {k} | {truth[k]:.4f} | " + " | ".join(f"{values[m][k]:.4g}" for m in METRICS) + " |")
        lines.append("")
        row = []
        for m in METRICS:
            adjusted = -values[m] if LOWER_IS_BETTER[m] else values[m]
            rho = spearman(adjusted, truth)
            best = int(np.nanargmax(adjusted))
            hit = bool(truth[best] >= best_truth - 0.01)
            summary[m]["rho"].append(rho)
            summary[m]["hit"].append(hit)
            row.append(f"{m}: ρ={rho:+.2f}, best layer {best}{' ✓' if hit else ''}")
        for name, layer in (("top layer", layers[-1]), ("middle layer", len(layers) // 2)):
            summary[name]["hit"].append(bool(truth[layer] >= best_truth - 0.01))
        lines += [f"Probe's best layer: {int(np.argmax(truth))}. " + "; ".join(row) + ".", ""]
        print(f"{task}: probe {np.round(truth, 4).tolist()}", flush=True)

    lines += ["## Summary over tasks", "", "| metric | mean ρ | median ρ | best-layer hits |", "|---|---:|---:|---:|"]
    for name, s in summary.items():
        rhos = [r for r in s["rho"] if not np.isnan(r)]
        mean = f"{statistics.mean(rhos):+.2f}" if rhos else "—"
        median = f"{statistics.median(rhos):+.2f}" if rhos else "—"
        lines.append(f"| {name} | {mean} | {median} | {sum(s['hit'])}/{len(s['hit'])} |")
    lines.append("")

    # Robustness (SST-2 train): sample size and 9:1 imbalance, ν vs nc1.
    table = read_labelled_text(DATA / "sst2" / "train.tsv")
    rng = np.random.default_rng(1)
    pool_idx = rng.permutation(len(table.texts))[: args.robustness_max]
    texts = list(table.texts[pool_idx])
    labels = np.array([table.labels[i] for i in pool_idx])
    features = pooled_features(model, tokenizer, texts, None)
    lines += ["## Robustness on SST-2 train (ν and nc1 per layer)", "",
              "| sample | class ratio | ν per layer | ℓ*(ν) | nc1 per layer | ℓ*(nc1) |", "|---|---|---|---:|---|---:|"]
    positives = np.flatnonzero(labels == 1)
    for size in [n for n in (500, 1000, 2000, 5000) if n < len(texts)] + [len(texts)]:
        for ratio in ("as is", "9:1"):
            idx, label = np.arange(size), f"{size}" if size < len(texts) else f"all ({size})"
            if ratio == "9:1":  # same size, resampled to 90 % positive / 10 % negative
                n = min(size, int(len(positives) / 0.9))  # "all": as many as the positives allow
                n_pos = int(0.9 * n)
                idx = np.concatenate([positives[:n_pos], np.flatnonzero(labels == 0)[: n - n_pos]])
                label = f"{n}" if n == size else f"{n} (all positives)"
            nu = [metric("variability", features[k][idx], labels[idx]) for k in range(features.shape[0])]
            nc = [metric("nc1", features[k][idx], labels[idx]) for k in range(features.shape[0])]
            lines.append(f"| {label} | {ratio} | "
                         f"{' '.join(f'{v:.3f}' for v in nu)} | {int(np.argmin(nu))} | "
                         f"{' '.join(f'{v:.3f}' for v in nc)} | {int(np.argmin(nc))} |")
    lines += ["", "ν is biased low when examples per class are not much more than d = 384: compare rows of "
              "one size.", ""]
    plot_curves(curves, Path(args.out).with_suffix(".png"))
    lines += [f"![probe accuracy and ν per layer]({Path(args.out).with_suffix('.png').name})", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


def plot_curves(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(curves)
    cols = 5
    rows = (len(tasks) + cols - 1) // cols
    figure, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), dpi=100, squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        truth, values = curves[task]
        layers = range(len(truth))
        (probe_line,) = ax.plot(layers, truth, "o-", color="#2a7d2a", label="probe")
        ax.set_title(task, fontsize=10)
        twin = ax.twinx()
        (nu_line,) = twin.plot(layers, values["variability"], "s--", color="#1f5aa6", label="ν")
        twin.set_yscale("log")
        ax.set_xticks(list(layers))
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_axis_off()
    figure.legend([probe_line, nu_line], ["probe accuracy, MCC for CoLA (left)", "ν (right, log; lower = better)"],
                  loc="lower center", ncol=2)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(path)


if __name__ == "__main__":
    main()
