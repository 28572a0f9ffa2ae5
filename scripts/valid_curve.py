"""Valid-set NLL by update count, read from fairseq-train logs: one Markdown row per run (stdout), to
compare how fast models converge. Columns are the validated update counts that are multiples of
--every, and each run's last; a run not validated at a column shows "-".

    python scripts/valid_curve.py --every 100 work/layers-wide-random.log work/layers-wide-init.log

``nll_loss`` is the student's own negative log-likelihood of the references (bits per token, no label
smoothing and no KD terms), so runs trained with different losses compare fairly.
"""
import argparse
import os
import re
import sys

VALID = re.compile(r"\| valid on 'valid' subset \|.*\| nll_loss ([\d.]+) \|.*\| num_updates (\d+)")


def valid_nll(log):
    """``{update count: valid nll_loss}`` of one fairseq-train log."""
    with open(log, encoding="utf-8") as f:
        points = {int(m.group(2)): float(m.group(1)) for m in map(VALID.search, f) if m}
    if not points:
        sys.exit(f"error: {log} has no validation lines ('valid on 'valid' subset ... num_updates N')")
    return points


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--every", type=int, default=100, help="keep update counts that are multiples of this")
    args = parser.parse_args()

    curves = {os.path.splitext(os.path.basename(log))[0]: valid_nll(log) for log in args.logs}
    columns = sorted({n for points in curves.values() for n in points if n % args.every == 0}
                     | {max(points) for points in curves.values()})
    lines = [
        "| valid NLL (bits/token) at update | " + " | ".join(str(n) for n in columns) + " |",
        "|---" + "|---:" * len(columns) + "|",
    ]
    lines += [f"| {name} | " + " | ".join(f"{points[n]:.2f}" if n in points else "-" for n in columns) + " |"
              for name, points in curves.items()]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
