"""Valid-set NLL by update count, read from fairseq-train logs: one Markdown row per run (stdout), to
compare how fast models converge. Columns are the validated update counts that are multiples of
--every (none with 0, for runs without a common budget), and each run's last; a run not validated at a
column shows "-".

    python scripts/valid_curve.py --every 100 work/layers-wide-random.log work/layers-wide-init.log \
        --plot work/layers-curves.png

``--plot`` also draws every validation of every run: valid NLL by update and, for runs validated with
``--eval-bleu``, valid BLEU by update.

``nll_loss`` is the student's own negative log-likelihood of the references (bits per token, no label
smoothing and no KD terms), so runs trained with different losses compare fairly.
"""
import argparse
import os
import re
import sys

from training_log import current_run

VALID = re.compile(r"\| valid on 'valid' subset \|.*\| nll_loss ([\d.]+) \|.*\| num_updates (\d+)")
BLEU = re.compile(r"\| bleu ([\d.]+) \|")


def valid_points(log):
    """``({update count: valid nll_loss}, {update count: valid BLEU})`` of one fairseq-train log's current run
    (the second empty without --eval-bleu)."""
    nll, bleu = {}, {}
    for line in current_run(log):
        match = VALID.search(line)
        if match:
            nll[int(match.group(2))] = float(match.group(1))
            if BLEU.search(line):
                bleu[int(match.group(2))] = float(BLEU.search(line).group(1))
    if not nll:
        sys.exit(f"error: {log} has no validation lines ('valid on 'valid' subset ... num_updates N')")
    return nll, bleu


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_bleu = any(bleu for _, bleu in curves.values())
    fig, axes = plt.subplots(1, 2 if with_bleu else 1, figsize=(11 if with_bleu else 6, 4), squeeze=False)
    for name, (nll, bleu) in curves.items():
        axes[0][0].plot(sorted(nll), [nll[n] for n in sorted(nll)], marker=".", label=name)
        if bleu:
            axes[0][1].plot(sorted(bleu), [bleu[n] for n in sorted(bleu)], marker=".", label=name)
    axes[0][0].set_ylabel("valid NLL (bits/token)")
    if with_bleu:
        axes[0][1].set_ylabel("valid BLEU (fairseq --eval-bleu)")
    for ax in axes[0]:
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--every", type=int, default=100,
                        help="keep update counts that are multiples of this; 0: only each run's last")
    parser.add_argument("--plot", help="also draw the curves into this PNG file")
    args = parser.parse_args()

    both = {os.path.splitext(os.path.basename(log))[0]: valid_points(log) for log in args.logs}
    curves = {name: nll for name, (nll, _) in both.items()}
    if args.every < 0:
        sys.exit(f"error: --every must be >= 0, got {args.every}")
    columns = sorted({n for points in curves.values() for n in points if args.every and n % args.every == 0}
                     | {max(points) for points in curves.values()})
    lines = [
        "| valid NLL (bits/token) at update | " + " | ".join(str(n) for n in columns) + " |",
        "|---" + "|---:" * len(columns) + "|",
    ]
    lines += [f"| {name} | " + " | ".join(f"{points[n]:.2f}" if n in points else "-" for n in columns) + " |"
              for name, points in curves.items()]
    print("\n".join(lines))
    if args.plot:
        plot(both, args.plot)


if __name__ == "__main__":
    main()
