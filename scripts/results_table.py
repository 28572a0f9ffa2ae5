"""Collect score.py records into one Markdown table (stdout) and one JSON list.

    python scripts/results_table.py --json results.json results/teacher.json results/student_*.json

The first record is the reference (the teacher): the table gives every model's BLEU retention and
parameter ratio against it.
"""
import argparse
import json


def length_ratio(record):
    """Records scored before score.py kept the length ratio have none."""
    ratio = record["test"].get("length_ratio")
    return "-" if ratio is None else f"{ratio:.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", nargs="+")
    parser.add_argument("--json", required=True, help="where to write all records as one JSON list")
    args = parser.parse_args()

    records = []
    for path in args.records:
        with open(path) as f:
            records.append(json.load(f))
    reference = records[0]
    lines = [
        "| model | params | params vs first | test BLEU | length ratio | test chrF | BLEU retention | valid BLEU"
        " | decode test (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    reference_bleu = reference["test"]["bleu"]
    for r in records:
        r["param_ratio"] = round(r["params"] / reference["params"], 3)
        r["bleu_retention"] = round(r["test"]["bleu"] / reference_bleu, 3) if reference_bleu > 0 else None
        retention = f"{100 * r['bleu_retention']:.1f} %" if r["bleu_retention"] is not None else "n/a"
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f} M | {100 * r['param_ratio']:.0f} % | {r['test']['bleu']:.2f} "
            f"| {length_ratio(r)} | {r['test']['chrf']:.2f} | {retention} | {r['valid']['bleu']:.2f} | {r['decode_seconds']:.0f} |"
        )
    with open(args.json, "w") as f:
        json.dump(records, f, indent=1)
    print("\n".join(lines))
    print(f"\nBLEU: {reference['bleu_signature']}\nchrF: {reference['chrf_signature']}")
    print(f"decoding: {reference['test']['sentences']} test sentences, {reference['threads']} CPU threads")


if __name__ == "__main__":
    main()
