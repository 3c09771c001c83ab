"""Train the bonsai-emoji evaluator on the train split of the emoji bundle and save it.

    python scripts/train_evaluator.py --data data/emoji --out data/evaluator --steps 400

Prints top-1/top-5 caption retrieval on the held-out split (eval images vs eval captions) and on
the train split, and stores them in evaluator.json."""

from __future__ import annotations

import argparse
import json
import time

import torch

from bonsai.data import load_emoji_dataset
from bonsai.eval.evaluator import save_evaluator
from bonsai.eval.train_evaluator import retrieval_report, train_evaluator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/emoji")
    ap.add_argument("--out", default="data/evaluator")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dataset = load_emoji_dataset(args.data)
    t0 = time.perf_counter()
    evaluator, losses = train_evaluator(dataset, args.steps, args.device, args.batch_size, args.lr, seed=args.seed)
    seconds = time.perf_counter() - t0
    evaluator = evaluator.cpu()
    report = retrieval_report(evaluator, dataset)
    for split, topk in report.items():
        n = dataset.splits.count(split)
        print(f"{split}: top-1 {topk[1]:.3f} top-5 {topk[5]:.3f} among {n} captions (chance {1 / n:.4f} / {5 / n:.4f})")
    extra = {
        "trained_on": f"{args.data} (train split)",
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "train_seconds": round(seconds, 1), "device": str(args.device), "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "retrieval": {split: {f"top{k}": round(v, 4) for k, v in topk.items()} for split, topk in report.items()},
    }
    folder = save_evaluator(evaluator, args.out, torch.float16, extra)
    print(json.dumps(extra))
    print(f"saved {folder} in {seconds:.0f}s of training")


if __name__ == "__main__":
    main()
