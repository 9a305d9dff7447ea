"""Does the paper's claim hold? Tune MiniLM four ways on the same budget and compare.

    python benchmarks/transfer_study.py --tasks sst2,cola --seeds 0,1,2 --epochs 3 --train-size 2000

Configurations (K = --num-tuned):
  1. full fine-tuning, head on the top layer;
  2. the top K layers tuned, head on the top layer (the paper's same-budget baseline);
  3. hsvfast's plan: head at ℓ* (argmin ν on the training subset), layers above dropped,
     K layers tuned — fine-tuning (3a) and sequential adapters (3b).
Reports the dev metric (accuracy; MCC for CoLA) as mean ± std over seeds, trainable parameters,
training time and inference FLOPs per example (2 × kept block and head parameters × tokens).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import hsvfast
from hsvfast.batching import BucketedBatches
from hsvfast.training import trainable_parameters

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def read_task(task: str, train_size: int, seed: int = 0):
    def tsv(path):
        return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    if task == "sst2":
        train = [(r[1], int(r[0])) for r in tsv(DATA / "sst2" / "train.tsv")[1:]]
        dev = [(r[0], int(r[1])) for r in tsv(DATA / "sst2" / "dev.tsv")[1:]]
        metric = "accuracy"
    elif task == "cola":
        train = [(r[3], int(r[1])) for r in tsv(DATA / "cola" / "train.tsv") + tsv(DATA / "cola" / "val.tsv")]
        dev = [(r[3], int(r[1])) for r in tsv(DATA / "cola" / "dev.tsv")]
        metric = "mcc"
    else:
        raise SystemExit(f"unknown task {task}")
    rng = np.random.default_rng(seed)
    train = [train[i] for i in rng.choice(len(train), size=min(train_size, len(train)), replace=False)]
    return train, dev, metric


def batches(rows, tokenizer, batch_size, shuffle_seed=None):
    texts, labels = [r[0] for r in rows], [r[1] for r in rows]
    built = list(BucketedBatches(texts, labels, tokenizer, batch_size=batch_size))
    if shuffle_seed is not None:  # bucketed for speed, batches in random order for SGD
        order = np.random.default_rng(shuffle_seed).permutation(len(built))
        built = [built[i] for i in order]
    return built


def inference_flops(classifier, eval_batches) -> float:
    blocks = hsvfast.find_blocks(classifier.backbone)
    kept = sum(p.numel() for p in blocks.parameters()) + sum(p.numel() for p in classifier.head.parameters())
    tokens = np.mean([int(b["attention_mask"].sum()) / len(b["labels"]) for b in eval_batches])
    return 2.0 * kept * tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,cola")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--num-tuned", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate")
    parser.add_argument("--adapter-lr", type=float, default=1e-3)
    parser.add_argument("--tolerance", type=float, default=0.05, help="for the 'earliest' plan (3c)")
    parser.add_argument("--only", default="", help="comma-separated configuration prefixes to run (e.g. 3c)")
    parser.add_argument("--out", default="transfer_study.json")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    from transformers import AutoModel, AutoTokenizer

    from hsvfast.cli import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    depth = len(hsvfast.find_blocks(base))
    k = args.num_tuned
    results = {}
    for task in args.tasks.split(","):
        train_rows, dev_rows, metric = read_task(task, args.train_size)
        dev = batches(dev_rows, tokenizer, 128)
        report = hsvfast.score(base, batches(train_rows, tokenizer, 128))
        plan = hsvfast.plan(report, num_tuned=k)
        early = hsvfast.plan(report, num_tuned=k, rule="earliest", tolerance=args.tolerance)
        top = hsvfast.Plan(head_layer=depth - 1, tuned_layers=list(range(depth - k, depth)),
                           frozen_layers=list(range(depth - k)), dropped_layers=[], num_blocks=depth, rule="top",
                           tolerance=0.0, flops_fraction=1.0)
        full = hsvfast.Plan(head_layer=depth - 1, tuned_layers=list(range(depth)), frozen_layers=[],
                            dropped_layers=[], num_blocks=depth, rule="full", tolerance=0.0, flops_fraction=1.0)
        configs = {
            "1 full fine-tuning (head on top)": (full, "finetune", args.lr),
            f"2 top {k} layers tuned (head on top)": (top, "finetune", args.lr),
            f"3a hsvfast plan: head at {plan.head_layer}, {k} tuned": (plan, "finetune", args.lr),
            f"3b hsvfast plan: head at {plan.head_layer}, adapters in {k}": (plan, "adapter", args.adapter_lr),
            f"3c hsvfast earliest-within-{args.tolerance:.0%} plan: head at {early.head_layer}, {k} tuned":
                (early, "finetune", args.lr),
        }
        if args.only:
            configs = {n: c for n, c in configs.items() if n.split()[0] in args.only.split(",")}
        print(f"\n{task}: ν per layer {[round(v, 4) for v in report.metrics['variability']]}, ℓ* = {plan.head_layer}",
              flush=True)
        results[task] = {"nu": report.metrics["variability"], "head_layer": plan.head_layer, "configs": {}}
        for name, (the_plan, method, lr) in configs.items():
            scores, seconds = [], []
            for seed in map(int, args.seeds.split(",")):
                torch.manual_seed(seed)
                classifier = hsvfast.apply(copy.deepcopy(base), the_plan, num_labels=2, method=method,
                                           tokenizer=tokenizer)
                began = time.perf_counter()
                history = hsvfast.train(classifier, batches(train_rows, tokenizer, args.batch_size, shuffle_seed=seed),
                                        dev, epochs=args.epochs, lr=lr, seed=seed, metric=metric, progress=False)
                seconds.append(time.perf_counter() - began)
                scores.append(max(h[metric] for h in history))
                params = trainable_parameters(classifier)
                flops = inference_flops(classifier, dev)
                print(f"  {name} seed {seed}: {metric} {scores[-1]:.4f} ({seconds[-1]:.0f} s)", flush=True)
            results[task]["configs"][name] = {
                "metric": metric, "mean": statistics.mean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "scores": scores, "trainable_parameters": params, "train_seconds": statistics.mean(seconds),
                "inference_gflops_per_example": flops / 1e9,
            }
    Path(args.out).write_text(json.dumps(results, indent=2))
    for task, result in results.items():
        print(f"\n### {task} (ν argmin ℓ* = {result['head_layer']}; train {args.train_size}, {args.epochs} epochs, "
              f"seeds {args.seeds})\n")
        print("| configuration | dev metric (mean ± std) | trainable params | train s | inference GFLOPs/example |")
        print("|---|---:|---:|---:|---:|")
        for name, c in result["configs"].items():
            print(f"| {name} | {c['metric']} {c['mean']:.4f} ± {c['std']:.4f} | {c['trainable_parameters']:,} | "
                  f"{c['train_seconds']:.0f} | {c['inference_gflops_per_example']:.3f} |")


if __name__ == "__main__":
    main()
