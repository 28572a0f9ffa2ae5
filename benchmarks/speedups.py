"""Speed-ups from a fairseq-kd-eval report: each model's sentences/s over each baseline's, per batch size.

    python benchmarks/speedups.py benchmarks/results/deploy-beam5.json --baselines teacher student-seq-word-kd \\
        --out benchmarks/results/deploy-speedups.md
"""
import argparse
import json


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", help="PREFIX.json written by fairseq-kd-eval")
    parser.add_argument("--baselines", nargs="+", required=True, help="model names to divide by")
    parser.add_argument("--out", required=True, help="Markdown file to write (also printed)")
    args = parser.parse_args()
    with open(args.report) as f:
        report = json.load(f)
    models, split = report["models"], report["settings"]["splits"][0]
    speed = {m["name"]: {s["batch_size"]: s["sentences_per_s"] for s in m["speed"]} for m in models}
    missing = [name for name in args.baselines if name not in speed]
    if missing:
        raise SystemExit(f"error: {args.report} has no model {', '.join(missing)}; it has {', '.join(speed)}")
    batch_sizes = sorted(next(iter(speed.values())))
    header = ["model", "BLEU"] + [f"b{b} over {name}" for name in args.baselines for b in batch_sizes]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for m in models:
        ratios = [f"{speed[m['name']][b] / speed[name][b]:.1f}x" for name in args.baselines for b in batch_sizes]
        lines.append(f"| {m['name']} | {m[split]['bleu']:.2f} | " + " | ".join(ratios) + " |")
    table = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(table)
    print(table, end="")


if __name__ == "__main__":
    main()
