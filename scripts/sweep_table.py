"""Collect the fairseq-kd-eval reports of a T x alpha sweep (examples/multi30k/sweep.sh, names
``sweep-SCHEDULE-T<T>-a<alpha>``) into a grid of test BLEU: a Markdown table (stdout, the test length ratio
and valid BLEU beside each test BLEU: a student that fails to stop shows in the ratio), OUT.json and a heat
map OUT.png.

    python scripts/sweep_table.py --out work/sweep-constant work/results/sweep-constant-T*-a*.json
"""
import argparse
import json
import re
import sys

NAME = re.compile(r"-T([0-9.]+)-a([0-9.]+)$")


def read_grid(paths):
    """``(temperatures, alphas, records by (T, alpha))`` from one-model fairseq-kd-eval reports, values sorted."""
    records = {}
    for path in paths:
        with open(path) as f:
            record = json.load(f)["models"][0]
        match = NAME.search(record["name"])
        if not match:
            sys.exit(f"error: {path}: record name {record['name']!r} does not end in -T<temperature>-a<alpha>")
        records[float(match.group(1)), float(match.group(2))] = record
    temperatures = sorted({t for t, _ in records})
    alphas = sorted({a for _, a in records})
    return temperatures, alphas, records


def cell(record):
    """``test BLEU (test length ratio; valid BLEU)`` of one grid point."""
    return f"{record['test']['bleu']:.2f} ({record['test']['length_ratio']:.3f}; {record['valid']['bleu']:.2f})"


def markdown(temperatures, alphas, records):
    lines = ["| T \\ alpha | " + " | ".join(f"{a:g}" for a in alphas) + " |", "|---" + "|---:" * len(alphas) + "|"]
    for t in temperatures:
        cells = [cell(records[t, a]) if (t, a) in records else "–" for a in alphas]
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heat_map(temperatures, alphas, records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    bleu = np.full((len(temperatures), len(alphas)), np.nan)
    for i, t in enumerate(temperatures):
        for j, a in enumerate(alphas):
            if (t, a) in records:
                bleu[i, j] = records[t, a]["test"]["bleu"]
    fig, ax = plt.subplots(figsize=(1.2 * len(alphas) + 2, 0.8 * len(temperatures) + 1.5))
    image = ax.imshow(bleu, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_yticks(range(len(temperatures)), [f"{t:g}" for t in temperatures])
    ax.set_xlabel("alpha (--kd-alpha)")
    ax.set_ylabel("T (--kd-temperature)")
    for (i, j), value in np.ndenumerate(bleu):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="white")
    fig.colorbar(image, ax=ax, label="test BLEU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", nargs="+", help="fairseq-kd-eval reports (PREFIX.json), one model each")
    parser.add_argument("--out", required=True, help="writes OUT.json and OUT.png")
    args = parser.parse_args()
    temperatures, alphas, records = read_grid(args.records)
    with open(args.out + ".json", "w") as f:
        json.dump([dict(r, temperature=t, alpha=a) for (t, a), r in sorted(records.items())], f, indent=1)
    heat_map(temperatures, alphas, records, args.out + ".png")
    any_record = next(iter(records.values()))
    print(markdown(temperatures, alphas, records))
    print(f"\ntest BLEU (test length ratio; valid BLEU); BLEU: {any_record['test']['bleu_signature']}")


if __name__ == "__main__":
    main()
