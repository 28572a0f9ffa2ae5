"""One table of a multilingual experiment from its fairseq-kd-eval reports, one per language pair.

    python scripts/multilingual_table.py --work WORK --experiment multilingual --pairs en-de en-fr en-cs \
        --models teacher bilingual-word-kd multilingual-word-kd --per-pair teacher bilingual-word-kd \
        --compare multilingual-word-kd:bilingual-word-kd

Reads ``WORK/results/EXPERIMENT.PAIR.json`` for each pair (the models evaluated on that pair's test set) and
writes ``WORK/results/EXPERIMENT.md`` and ``.json``: test BLEU and length ratio per pair, the average BLEU and
chrF over the pairs a model translates, its parameters, and its training speed (target tokens per second:
the median of fairseq's ``wps`` over the log intervals of ``WORK/NAME.log``, which a paused run, an epoch's
validation or a last short epoch moves little; over its epochs for a run shorter than one interval). A ``--per-pair`` name is a bilingual model per
pair (``WORK/NAME-PAIR.log``): its parameters are added up over the pairs. A student trained with
``--kd-threshold`` also gets its comparisons with the teachers from its log, and per pair the updates at
which KD switched off or back on. ``--compare A:B`` adds how model A differs from model B: test BLEU per
pair and on average, chrF on average, over the pairs both translate, and A's training speed as a multiple
of B's.
"""
import argparse
import json
import os
import re
import statistics

from training_log import current_run


def training_speed(log):
    """Median of fairseq's training wps over the log intervals of a training log; for a run shorter than one
    interval, over its epochs (None without either)."""
    lines = current_run(log)
    number = r"([0-9.]+(?:e[+-]?[0-9]+)?)"
    for kind, pattern in (("| train_inner |", f"wps={number}"), ("| train | epoch", rf"\| wps {number}")):
        values = [float(m.group(1)) for line in lines if kind in line for m in [re.search(pattern, line)] if m]
        if values:
            return statistics.median(values)
    return None


THRESHOLD_CHECK = re.compile(r"kd-threshold at update (\d+): (\S+) student (\S+) ([-0-9.]+), teacher ([-0-9.]+): KD (on|off)")


def threshold_checks(log):
    """The --kd-threshold comparisons in a training log, by update and pair. A resumed run appends to its log
    and repeats the updates after its last checkpoint: the later line of an update counts."""
    checks = {}
    for match in filter(None, map(THRESHOLD_CHECK.search, current_run(log))):
        update, pair, metric, student, teacher, kd = match.groups()
        checks[int(update), pair] = {"update": int(update), "pair": pair, "metric": metric,
                                     "student": float(student), "teacher": float(teacher), "kd": kd}
    return [checks[key] for key in sorted(checks)]


def switches(checks, pair):
    """'off at 1632, on at 3264' (KD starts on), or 'on throughout'."""
    state, events = "on", []
    for check in checks:
        if check["pair"] == pair and check["kd"] != state:
            state = check["kd"]
            events.append(f"{state} at {check['update']}")
    return ", ".join(events) or "on throughout"


def model_row(work, name, reports, per_pair):
    found = {pair: next(m for m in report["models"] if m["name"] == name)
             for pair, report in reports.items() if any(m["name"] == name for m in report["models"])}
    if not found:
        raise SystemExit(f"error: {name} is in none of the reports of {', '.join(reports)}")
    logs = [os.path.join(work, f"{name}-{pair}.log") for pair in found] if per_pair else [os.path.join(work, f"{name}.log")]
    speeds = [s for s in map(training_speed, logs) if s is not None]
    scores = {pair: {key: m["test"][key] for key in ("bleu", "chrf", "length_ratio")} for pair, m in found.items()}
    checks = [] if per_pair else threshold_checks(logs[0])
    return {
        "name": name,
        "models": "a model per pair" if per_pair else "one model",
        "params": sum(m["params"] for m in found.values()) if per_pair else next(iter(found.values()))["params"],
        "pairs": scores,
        "average_bleu": round(statistics.mean(s["bleu"] for s in scores.values()), 2),
        "average_chrf": round(statistics.mean(s["chrf"] for s in scores.values()), 2),
        "train_wps": round(statistics.mean(speeds), 1) if speeds else None,
        **({"threshold_checks": checks, "kd_switches": {pair: switches(checks, pair) for pair in found}} if checks else {}),
    }


def comparison(rows, first, second):
    """How row ``first`` differs from row ``second`` over the pairs both translate."""
    a, b = rows[first], rows[second]
    pairs = [pair for pair in a["pairs"] if pair in b["pairs"]]
    if not pairs:
        raise SystemExit(f"error: --compare {first}:{second}: the two models translate no pair in common")
    bleu = {pair: a["pairs"][pair]["bleu"] - b["pairs"][pair]["bleu"] for pair in pairs}
    chrf = statistics.mean(a["pairs"][pair]["chrf"] - b["pairs"][pair]["chrf"] for pair in pairs)
    speed = a["train_wps"] / b["train_wps"] if a["train_wps"] and b["train_wps"] else None
    return {"model": first, "against": second, "bleu": {pair: round(diff, 2) for pair, diff in bleu.items()},
            "average_bleu": round(statistics.mean(bleu.values()), 2), "average_chrf": round(chrf, 2),
            "speed_ratio": round(speed, 3) if speed else None}


def markdown(rows, pairs, signature, comparisons, trained_at_once):
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
              " pairs each model translates." + (" The models trained at once on one machine: their training speeds"
                                                 " are not comparable." if trained_at_once else "")]
    for c in comparisons:
        per_pair = ", ".join(f"{pair} {value:+.2f}" for pair, value in c["bleu"].items())
        speed = f"; training tokens/s {c['speed_ratio']:.2f}×" if c["speed_ratio"] else ""
        lines += ["", f"{c['model']} − {c['against']}: test BLEU {per_pair}; over these pairs {c['average_bleu']:+.2f} BLEU,"
                  f" {c['average_chrf']:+.2f} chrF{speed}."]
    for row in rows:
        if "kd_switches" in row:
            checks = row["threshold_checks"]
            updates = sorted({c["update"] for c in checks})
            gaps = {pair: ", ".join(f"{c['student'] - c['teacher']:+.2f}" for c in checks if c["pair"] == pair)
                    for pair in row["kd_switches"]}
            lines += ["", f"{row['name']}, the threshold strategy: student − teacher {checks[0]['metric']} on each pair's"
                      f" validation data at updates {', '.join(map(str, updates))}; "
                      + "; ".join(f"{pair} {gaps[pair]} (KD {events})" for pair, events in row["kd_switches"].items())
                      + "."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--pairs", nargs="+", required=True)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--per-pair", nargs="*", default=[], help="models that are a bilingual model per pair")
    parser.add_argument("--compare", nargs="*", default=[], metavar="A:B",
                        help="model A against model B (both in --models): their differences over their common pairs")
    parser.add_argument("--trained-at-once", action="store_true",
                        help="the models trained at the same time on one machine: say that their speeds do not compare")
    args = parser.parse_args()
    pairs_to_compare = [tuple(item.split(":")) for item in args.compare]
    for item, names in zip(args.compare, pairs_to_compare):
        if len(names) != 2 or not set(names) <= set(args.models):
            raise SystemExit(f"error: --compare {item}: give A:B, two of --models")
    prefix = os.path.join(args.work, "results", args.experiment)
    reports = {}
    for pair in args.pairs:
        with open(f"{prefix}.{pair}.json") as f:
            reports[pair] = json.load(f)
    rows = [model_row(args.work, name, reports, name in args.per_pair) for name in args.models]
    by_name = {row["name"]: row for row in rows}
    comparisons = [comparison(by_name, first, second) for first, second in pairs_to_compare]
    signature = next(iter(reports.values()))["models"][0]["test"]["bleu_signature"]
    with open(prefix + ".json", "w") as f:
        json.dump({"experiment": args.experiment, "pairs": args.pairs, "bleu_signature": signature,
                   "trained_at_once": args.trained_at_once, "models": rows, "comparisons": comparisons}, f, indent=1)
    with open(prefix + ".md", "w") as f:
        f.write(markdown(rows, args.pairs, signature, comparisons, args.trained_at_once))


if __name__ == "__main__":
    main()
