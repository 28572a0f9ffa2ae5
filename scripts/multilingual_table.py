"""One table of a multilingual experiment from its fairseq-kd-eval reports, one per language pair.

    python scripts/multilingual_table.py --work WORK --experiment multilingual --pairs en-de en-fr en-cs \
        --models teacher bilingual-word-kd multilingual-word-kd --per-pair teacher bilingual-word-kd

Reads ``WORK/results/EXPERIMENT.PAIR.json`` for each pair (the models evaluated on that pair's test set) and
writes ``WORK/results/EXPERIMENT.md`` and ``.json``: test BLEU and length ratio per pair, the average BLEU and
chrF over the pairs a model translates, its parameters, and its training speed (target tokens per second:
the mean of fairseq's per-epoch ``wps`` in ``WORK/NAME.log``). A ``--per-pair`` name is a bilingual model per
pair (``WORK/NAME-PAIR.log``): its parameters are added up over the pairs.
"""
import argparse
import json
import os
import re
import statistics


def training_speed(log):
    """Mean of fairseq's per-epoch training wps in a training log (None without one)."""
    if not os.path.isfile(log):
        return None
    with open(log, errors="replace") as f:
        values = [float(m.group(1)) for line in f if "| train | epoch" in line
                  for m in [re.search(r"\| wps ([0-9.]+)", line)] if m]
    return statistics.mean(values) if values else None


def model_row(work, name, reports, per_pair):
    found = {pair: next(m for m in report["models"] if m["name"] == name)
             for pair, report in reports.items() if any(m["name"] == name for m in report["models"])}
    if not found:
        raise SystemExit(f"error: {name} is in none of the reports of {', '.join(reports)}")
    logs = [os.path.join(work, f"{name}-{pair}.log") for pair in found] if per_pair else [os.path.join(work, f"{name}.log")]
    speeds = [s for s in map(training_speed, logs) if s is not None]
    scores = {pair: {key: m["test"][key] for key in ("bleu", "chrf", "length_ratio")} for pair, m in found.items()}
    return {
        "name": name,
        "models": "a model per pair" if per_pair else "one model",
        "params": sum(m["params"] for m in found.values()) if per_pair else next(iter(found.values()))["params"],
        "pairs": scores,
        "average_bleu": round(statistics.mean(s["bleu"] for s in scores.values()), 2),
        "average_chrf": round(statistics.mean(s["chrf"] for s in scores.values()), 2),
        "train_wps": round(statistics.mean(speeds), 1) if speeds else None,
    }


def markdown(rows, pairs, signature):
    header = ["model", "params", *[f"{pair} BLEU (length ratio)" for pair in pairs], "average BLEU", "average chrF",
              "train tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [f"{row['pairs'][p]['bleu']:.2f} ({row['pairs'][p]['length_ratio']:.3f})" if p in row["pairs"] else "–"
                 for p in pairs]
        speed = f"{row['train_wps']:.0f}" if row["train_wps"] else "–"
        lines.append(f"| {row['name']} ({row['models']}) | {row['params'] / 1e6:.2f} M | " + " | ".join(cells)
                     + f" | {row['average_bleu']:.2f} | {row['average_chrf']:.2f} | {speed} |")
    lines += ["", f"sacrebleu {signature}; test_2016_flickr, fairseq's default length limits; averages over the"
              " pairs each model translates."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--pairs", nargs="+", required=True)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--per-pair", nargs="*", default=[], help="models that are a bilingual model per pair")
    args = parser.parse_args()
    prefix = os.path.join(args.work, "results", args.experiment)
    reports = {}
    for pair in args.pairs:
        with open(f"{prefix}.{pair}.json") as f:
            reports[pair] = json.load(f)
    rows = [model_row(args.work, name, reports, name in args.per_pair) for name in args.models]
    signature = next(iter(reports.values()))["models"][0]["test"]["bleu_signature"]
    with open(prefix + ".json", "w") as f:
        json.dump({"experiment": args.experiment, "pairs": args.pairs, "bleu_signature": signature, "models": rows}, f,
                  indent=1)
    with open(prefix + ".md", "w") as f:
        f.write(markdown(rows, args.pairs, signature))


if __name__ == "__main__":
    main()
