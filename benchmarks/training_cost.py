"""Training cost of KD: the same student, data, batches and number of updates trained with plain
label-smoothed cross-entropy, with an online teacher (full distribution and top-k), from top-k teacher
caches and (``--mutual``) together with a peer by deep mutual learning, one after the other in this one run;
tokens/s and peak memory of each, as ratios to plain.

    python benchmarks/training_cost.py --data work/multi30k-en-de-full/data-bin \
        --teacher work/multi30k-en-de-full/teacher/checkpoint_last.pt --cache 8=work/multi30k-en-de-full/cache \
        --updates 60 --out benchmarks/results/training_cost

``--lang-pairs`` measures a multilingual student instead (``translation_multi_distillation`` with the language
tokens and uniform sampling of ``examples/multi30k/multilingual.sh``); each cache then names one per pair:

    python benchmarks/training_cost.py --data work/multi30k-multilingual-full/data/data-bin \
        --lang-pairs en-de,en-fr,en-cs --cache 8=en-de:work/.../cache-en-de,en-fr:...,en-cs:... \
        --updates 60 --out benchmarks/results/training_cost_multilingual

``--cpu-bf16`` adds each variant again with the forward passes autocast to bfloat16 (the task's --cpu-bf16);
``--model="FLAGS"`` trains another architecture than the tiny student, e.g. the teacher's:

    python benchmarks/training_cost.py --data work/multi30k-en-de-full/data-bin --cpu-bf16 --updates 40 \
        --model="--arch transformer --encoder-layers 3 --decoder-layers 3 --encoder-embed-dim 256 ..." \
        --out benchmarks/results/training_cost_bf16_teacher

Tokens/s is the median of fairseq's per-interval ``wps`` after the first interval (start-up and warm-up
excluded), and with ``--repeats`` the median over runs; peak memory is the peak resident set size of the
training process, or with ``--gpu`` (training on the GPU, --fp16) the peak of torch's CUDA allocations.
Writes OUT.json and OUT.md.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

import torch

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fairseq_kd")
MODEL = "--arch transformer_student_tiny"
TRAINING = (
    "--share-all-embeddings --dropout 0.1 --criterion kd_label_smoothed_cross_entropy --label-smoothing 0.1 "
    "--optimizer adam --adam-betas (0.9,0.98) --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 300 "
    "--max-tokens 4096 --seed 1 --log-format simple --disable-validation --no-save"
).split()


# fairseq-train in this interpreter; fairseq resets CUDA's peak-memory counter at every update, so keep it
# for the whole run and print it at the end
TRAIN = """
import sys, torch
from fairseq_cli.train import cli_main
torch.cuda.reset_peak_memory_stats = lambda *args, **kwargs: None
cli_main()
if torch.cuda.is_available():
    print(f"peak_cuda_mb={torch.cuda.max_memory_allocated() / 2**20:.1f}")
"""


def task_flags(data, lang_pairs):
    """The bilingual distillation task, or with ``lang_pairs`` the multilingual one as multilingual.sh runs it."""
    if not lang_pairs:
        return ["--task", "translation_distillation"]
    # --num-workers 0: the multilingual task's per-epoch data loaders otherwise wait 5 s each to shut down
    return ["--task", "translation_multi_distillation", "--lang-pairs", lang_pairs,
            "--lang-dict", os.path.join(data, "langs.txt"), "--encoder-langtok", "src", "--decoder-langtok",
            "--sampling-method", "uniform", "--num-workers", "0"]


def train(data, task, model, updates, log_interval, gpu, extra):
    """Run fairseq-train; return (per-interval wps values, peak memory in MB)."""
    device = ["--fp16"] if gpu else ["--cpu"]
    command = [sys.executable, "-c", TRAIN, data, "--user-dir", PLUGIN, *task, *model.split(), *TRAINING, *device,
               "--max-update", str(updates), "--log-interval", str(log_interval), *extra]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        log.seek(0)
        text = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: fairseq-train failed for {' '.join(extra)}:\n{text[-3000:]}")
    wps = [float(v) for v in re.findall(r"train_inner \|.*?wps=([\d.]+)", text)]
    peak_mb = float(re.search(r"peak_cuda_mb=([\d.]+)", text).group(1)) if gpu else usage.ru_maxrss / 1024
    return wps, peak_mb


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="binarized training data")
    parser.add_argument("--lang-pairs", help="a multilingual student of these comma-separated pairs; --teacher and "
                        "each --cache DIR then name one per pair, PAIR:PATH,...")
    parser.add_argument("--teacher", help="a teacher checkpoint: adds the online-teacher variants")
    parser.add_argument("--cache", action="append", default=[], metavar="K=DIR",
                        help="a top-k cache of that teacher on --data (repeatable)")
    parser.add_argument("--topk", type=int, default=8, help="k of the online top-k variant")
    parser.add_argument("--mutual", action="store_true",
                        help="add deep mutual learning: two such students trained together (no teacher)")
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every variant this many times, round robin, and keep the median")
    parser.add_argument("--gpu", action="store_true", help="train on the GPU with --fp16")
    parser.add_argument("--cpu-bf16", action="store_true", help="add every variant again with --cpu-bf16")
    parser.add_argument("--model", default=MODEL, help=f"the architecture flags (default: {MODEL})")
    parser.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()

    task = task_flags(args.data, args.lang_pairs)
    # the multilingual task takes a teacher and a cache per pair
    teacher_flag, cache_flag = ("--teacher-paths", "--teacher-topk-caches") if args.lang_pairs else (
        "--teacher-path", "--teacher-topk-cache")
    variants = [("plain label-smoothed CE", ["--kd-alpha", "0"])]
    if args.teacher:
        variants += [
            ("online teacher, full distribution", ["--kd-alpha", "0.5", teacher_flag, args.teacher]),
            (f"online teacher, top-{args.topk}",
             ["--kd-alpha", "0.5", teacher_flag, args.teacher, "--kd-topk", str(args.topk)]),
        ]
    for item in args.cache:
        k, _, directory = item.partition("=")
        variants.append((f"top-{k} cache", ["--kd-alpha", "0.5", cache_flag, directory, "--kd-topk", k]))
    if args.mutual:
        variants.append(("deep mutual learning, two students", ["--kd-alpha", "0.5", "--arch", "transformer_mutual_student_tiny"]))

    if args.cpu_bf16:
        variants += [(f"{name}, --cpu-bf16", [*extra, "--cpu-bf16"]) for name, extra in variants]
    memory = "CUDA allocated" if args.gpu else "RSS"
    runs = {name: [] for name, _ in variants}
    for repeat in range(args.repeats):  # round robin, so that drift in machine speed hits every variant
        for name, extra in variants:
            wps, peak_mb = train(args.data, task, args.model, args.updates, args.log_interval, args.gpu, extra)
            if len(wps) < 2:
                sys.exit("error: too few log intervals; raise --updates or lower --log-interval")
            runs[name].append((statistics.median(wps[1:]), peak_mb))
            print(f"[{repeat + 1}/{args.repeats}] {name}: {runs[name][-1][0]:.0f} tokens/s, peak {memory} {peak_mb:.0f} MB",
                  flush=True)
    rows = [{"variant": name, "flags": " ".join(extra),
             "tokens_per_s": statistics.median(speed for speed, _ in runs[name]),
             "tokens_per_s_runs": [speed for speed, _ in runs[name]],
             "peak_memory_mb": round(max(peak for _, peak in runs[name]), 1)}
            for name, extra in variants]
    plain = rows[0]
    lines = [f"| variant | target tokens/s | vs plain | peak {memory} MB | vs plain |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        row["speed_ratio"] = round(row["tokens_per_s"] / plain["tokens_per_s"], 3)
        row["memory_ratio"] = round(row["peak_memory_mb"] / plain["peak_memory_mb"], 3)
        lines.append(f"| {row['variant']} | {row['tokens_per_s']:.0f} | {row['speed_ratio']:.2f}x "
                     f"| {row['peak_memory_mb']:.0f} | {row['memory_ratio']:.2f}x |")
    device = torch.cuda.get_device_name(0) + ", --fp16" if args.gpu else f"cpu, {torch.get_num_threads()} torch threads"
    settings = {"updates": args.updates, "repeats": args.repeats, "device": device, "memory": f"peak {memory}",
                "model": args.model, "max_tokens": 4096, "data": args.data, "lang_pairs": args.lang_pairs}
    lines.append("")
    student = f"{args.model}, one student of {args.lang_pairs}" if args.lang_pairs else args.model
    lines.append(f"{student}; {args.updates} updates per run, {args.repeats} run(s) per variant round robin; tokens/s: median over"
                 f" runs of the median per-{args.log_interval}-update wps after the first interval; peak {memory}: the highest; "
                 f"{device}, {os.cpu_count()} CPUs.")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"settings": settings, "variants": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
