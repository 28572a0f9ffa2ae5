"""``fairseq-kd-eval``: quality, size, speed and memory of a teacher and its students, side by side.

    fairseq-kd-eval data-bin --checkpoints teacher=teacher.pt student=student.pt \\
        --split test --reference raw/test.de --post-process sentencepiece --beam 5 \\
        --batch-sizes 1,32,128 --threads 1 --out-prefix results/eval

writes ``results/eval.json``, ``results/eval.md`` and ``results/eval.png`` (BLEU against throughput, point
area proportional to parameters). The first checkpoint is the reference for compression ratio and BLEU
retention. Each model is measured in a fresh process, one after the other, so peak memory is its own and
no two models compete for the CPU.

Quality: sacrebleu BLEU, chrF and TER of the whole split, detokenized with ``--post-process``, against
``--reference`` (the raw reference file; default: the split's binarized targets, detokenized the same way).
Speed: the first ``--speed-sentences`` sentences decoded in batches of each size, one warm-up pass, then
the median of ``--repeats`` timed passes; sentences/s and generated target tokens/s (EOS included).
Memory: peak resident set size of the process (CPU) or peak allocated memory (GPU) while decoding.
"""
import argparse
import json
import logging
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
import traceback

import fairseq
import torch
from fairseq import options, tasks, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.logging import progress_bar
from sacrebleu.metrics import BLEU, CHRF, TER

from fairseq_kd.errors import FairseqKDError
from fairseq_kd.tasks.translation_distillation import check_checkpoint_dictionaries, read_checkpoint

logger = logging.getLogger("fairseq_kd.evaluate")


def count_parameters(model_state):
    """``(total, embedding, bytes)`` of the parameters of a saved model state, counting tied (shared)
    tensors once.
    Embeddings are the token and learned position tables; fairseq's one-element ``.version`` entries
    are not parameters."""
    seen, total, embedding, size = set(), 0, 0, 0
    for key, tensor in model_state.items():
        pointer = tensor.untyped_storage().data_ptr()
        if key.endswith(".version") or pointer in seen:
            continue
        seen.add(pointer)
        total += tensor.numel()
        size += tensor.numel() * tensor.element_size()
        if "embed_tokens" in key or "embed_positions" in key:
            embedding += tensor.numel()
    return total, embedding, size


def quality_scores(hypotheses, references):
    """Corpus BLEU, chrF and TER with their sacrebleu signatures."""
    scores = {}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF()), ("ter", TER())):
        scores[name] = round(metric.corpus_score(hypotheses, [references]).score, 2)
        scores[f"{name}_signature"] = str(metric.get_signature())
    return scores


def machine_description(device):
    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "fairseq": fairseq.__version__,
        "python": platform.python_version(),
    }


def get_parser():
    parser = argparse.ArgumentParser(
        prog="fairseq-kd-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", help="fairseq data-bin the models were trained on")
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="NAME=CHECKPOINT",
                        help="models to compare; the first is the reference (usually the teacher)")
    parser.add_argument("--split", default="test", help="split to decode (default: test)")
    parser.add_argument("--source-lang", default=None)
    parser.add_argument("--target-lang", default=None)
    parser.add_argument("--reference", default=None,
                        help="raw (detokenized) reference file, one line per sentence of the split")
    parser.add_argument("--post-process", default="sentencepiece",
                        help="how fairseq detokenizes output: sentencepiece, subword_nmt, none, ...")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--max-len-a", type=float, default=1.2)
    parser.add_argument("--max-len-b", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=8000, help="batch size of the quality pass")
    parser.add_argument("--batch-sizes", default="1,32,128", help="comma-separated batch sizes timed")
    parser.add_argument("--speed-sentences", type=int, default=128, help="sentences decoded per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per batch size (median kept)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads of torch")
    parser.add_argument("--cpu", action="store_true", help="use the CPU even when a GPU is available")
    parser.add_argument("--out-prefix", required=True, help="writes PREFIX.json, PREFIX.md and PREFIX.png")
    return parser


def parse_checkpoints(items):
    named = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise FairseqKDError(f"--checkpoints takes NAME=CHECKPOINT items, got {item!r}")
        if not os.path.isfile(path):
            raise FairseqKDError(f"--checkpoints: no such file {path!r} (for {name}); give a checkpoint .pt file")
        named.append((name, path))
    return named


def check_arguments(args):
    try:
        batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b})
    except ValueError:
        raise FairseqKDError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    for option, value in (("--beam", args.beam), ("--repeats", args.repeats), ("--threads", args.threads),
                          ("--speed-sentences", args.speed_sentences), ("batch size", min(batch_sizes, default=1))):
        if value < 1:
            raise FairseqKDError(f"{option} must be >= 1, got {value}")
    return batch_sizes


def setup_task(args):
    """A ``translation`` task on the data, with the generation settings of ``args``."""
    fairseq_args = [args.data, "--task", "translation", "--beam", str(args.beam),
                    "--max-len-a", str(args.max_len_a), "--max-len-b", str(args.max_len_b),
                    "--gen-subset", args.split]
    for option, value in (("--source-lang", args.source_lang), ("--target-lang", args.target_lang)):
        if value:
            fairseq_args += [option, value]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_generation_parser(), fairseq_args))
    empty = FairseqKDError(f"split '{args.split}' of {args.data} has no sentences; binarize a non-empty split")
    try:
        task = tasks.setup_task(cfg.task)
        src, tgt = task.cfg.source_lang, task.cfg.target_lang
        # fairseq cannot even open an empty binarized split (mmap of an empty file)
        for pair in (f"{src}-{tgt}", f"{tgt}-{src}"):
            source_file = os.path.join(utils.split_paths(args.data)[0], f"{args.split}.{pair}.{src}.bin")
            if os.path.isfile(source_file) and os.path.getsize(source_file) == 0:
                raise empty
        task.load_dataset(args.split)
    except FileNotFoundError as e:
        raise FairseqKDError(f"{args.data}: {e}; check the data directory, --split and the languages") from None
    if len(task.dataset(args.split)) == 0:
        raise empty
    return cfg, task


def load_references(args, task):
    dataset = task.dataset(args.split)
    if args.reference is None:
        return [task.tgt_dict.string(dataset[i]["target"], args.post_process) for i in range(len(dataset))]
    with open(args.reference, encoding="utf-8") as f:
        references = [line.rstrip("\n") for line in f]
    if len(references) != len(dataset):
        raise FairseqKDError(
            f"--reference {args.reference} has {len(references)} lines but split '{args.split}' has"
            f" {len(dataset)} sentences; give the raw reference file of that split"
        )
    return references


def decode(task, generator, model, dataset, indices, batch_size=None, max_tokens=None, show_progress=False):
    """Hypotheses of the sentences ``indices``: ``{id: target tokens}``, in batches of ``batch_size``
    sentences (consecutive in the order given) or of up to ``max_tokens`` tokens (fairseq's length-sorted
    batching)."""
    if batch_size is not None:
        batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    else:
        batches = dataset.batch_by_size(dataset.ordered_indices(), max_tokens=max_tokens, required_batch_size_multiple=1)
    device = next(model.parameters()).device
    progress = progress_bar.progress_bar(batches, log_interval=10, prefix="decode") if show_progress else batches
    hypotheses = {}
    for batch in progress:
        sample = dataset.collater([dataset[i] for i in batch])
        if device.type == "cuda":
            sample = utils.move_to_cuda(sample)
        for sample_id, hypos in zip(sample["id"].tolist(), task.inference_step(generator, [model], sample)):
            hypotheses[sample_id] = hypos[0]["tokens"].cpu()
        if show_progress:
            progress.log({"sentences": len(hypotheses)})
    return hypotheses


def evaluate_model(args, name, path, batch_sizes, references):
    """Everything measured about one model, in the current process."""
    torch.set_num_threads(args.threads)
    use_cuda = torch.cuda.is_available() and not args.cpu
    cfg, task = setup_task(args)
    checkpoint_cfg, state = read_checkpoint(path, "--checkpoints")
    check_checkpoint_dictionaries(path, f"checkpoint {path}", checkpoint_cfg, state["model"], task)
    total, embedding, weight_bytes = count_parameters(state["model"])
    model = task.build_model(checkpoint_cfg.model, from_checkpoint=True)
    model.load_state_dict(state["model"], strict=True, model_cfg=checkpoint_cfg.model)
    del state
    model.eval()
    if use_cuda:
        model.cuda()
        torch.cuda.reset_peak_memory_stats()
    generator = task.build_generator([model], cfg.generation)
    dataset = task.dataset(args.split)

    logger.info(f"{name}: decoding {len(dataset)} sentences of '{args.split}' (beam {args.beam})")
    with torch.no_grad():
        hypotheses = decode(task, generator, model, dataset, None, max_tokens=args.max_tokens, show_progress=True)
    outputs = [task.tgt_dict.string(hypotheses[i], args.post_process) for i in range(len(dataset))]
    record = {"name": name, "checkpoint": path, "params": total, "embedding_params": embedding,
              "non_embedding_params": total - embedding, "weights_mb": round(weight_bytes / 2**20, 2),
              "checkpoint_mb": round(os.path.getsize(path) / 2**20, 2),
              **quality_scores(outputs, references), "speed": []}

    indices = list(range(min(args.speed_sentences, len(dataset))))
    for batch_size in batch_sizes:
        timings = []
        with torch.no_grad():
            for repeat in range(args.repeats + 1):  # the first pass warms up
                start = time.perf_counter()
                timed = decode(task, generator, model, dataset, indices, batch_size=batch_size)
                if use_cuda:
                    torch.cuda.synchronize()
                timings.append(time.perf_counter() - start)
        seconds = statistics.median(timings[1:])
        tokens = sum(len(tokens) for tokens in timed.values())
        record["speed"].append({"batch_size": batch_size, "sentences": len(indices), "seconds": round(seconds, 3),
                                "sentences_per_s": round(len(indices) / seconds, 2),
                                "tokens_per_s": round(tokens / seconds, 1)})
        logger.info(f"{name}: batch {batch_size}: {len(indices) / seconds:.1f} sentences/s (median of {args.repeats})")
    if use_cuda:
        record["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        record["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return record


def _child(args, name, path, batch_sizes, references, queue):
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout, force=True)
    try:
        queue.put(evaluate_model(args, name, path, batch_sizes, references))
    except FairseqKDError as e:
        queue.put(e)
    except Exception:  # the parent waits on the queue: hand every failure back
        queue.put(RuntimeError(f"evaluating {name} failed:\n{traceback.format_exc()}"))


def markdown_table(report):
    batch_sizes = [s["batch_size"] for s in report["models"][0]["speed"]]
    header = ["model", "params", "compression", "weights MB", "BLEU", "chrF", "TER", "BLEU retention"]
    header += [f"sent/s b{b}" for b in batch_sizes] + ["peak memory MB"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for m in report["models"]:
        retention = "n/a" if m["bleu_retention"] is None else f"{m['bleu_retention']:.1%}"
        row = [m["name"], f"{m['params'] / 1e6:.2f} M", f"{m['compression']:.2f}x", f"{m['weights_mb']:.1f}",
               f"{m['bleu']:.2f}", f"{m['chrf']:.2f}", f"{m['ter']:.2f}", retention]
        row += [f"{s['sentences_per_s']:.1f}" for s in m["speed"]] + [f"{m['peak_memory_mb']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    machine = report["machine"]
    settings = report["settings"]
    lines += [
        "",
        f"{settings['split']} ({settings['sentences']} sentences), beam {settings['beam']}; speed: first"
        f" {settings['speed_sentences']} sentences, median of {settings['repeats']} after a warm-up pass;"
        f" {machine['device']}, {machine['cpu']}, {settings['threads']} torch threads; torch {machine['torch']},"
        f" fairseq {machine['fairseq']}.",
        f"{report['models'][0]['bleu_signature']}",
    ]
    return "\n".join(lines) + "\n"


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_size = max(s["batch_size"] for s in report["models"][0]["speed"])
    fig, ax = plt.subplots(figsize=(6, 4))
    largest = max(m["params"] for m in report["models"])
    for m in report["models"]:
        speed = next(s["sentences_per_s"] for s in m["speed"] if s["batch_size"] == batch_size)
        ax.scatter(speed, m["bleu"], s=600 * m["params"] / largest, alpha=0.6)
        ax.annotate(f"{m['name']} ({m['params'] / 1e6:.1f} M)", (speed, m["bleu"]), textcoords="offset points",
                    xytext=(6, 6), fontsize=8)
    ax.set_xlabel(f"sentences/s, batch {batch_size}, beam {report['settings']['beam']}")
    ax.set_ylabel(f"BLEU ({report['settings']['split']})")
    ax.set_title(f"quality vs throughput ({report['machine']['device']}, {report['settings']['threads']} threads)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout, force=True)
    args = get_parser().parse_args(argv)
    named = parse_checkpoints(args.checkpoints)
    batch_sizes = check_arguments(args)
    _, task = setup_task(args)
    references = load_references(args, task)
    context = multiprocessing.get_context("spawn")
    models = []
    for name, path in named:
        queue = context.Queue()
        child = context.Process(target=_child, args=(args, name, path, batch_sizes, references, queue))
        child.start()
        result = queue.get()
        child.join()
        if isinstance(result, Exception):
            raise result
        models.append(result)
    reference = models[0]
    for m in models:
        m["compression"] = reference["params"] / m["params"]
        m["bleu_retention"] = m["bleu"] / reference["bleu"] if reference["bleu"] > 0 else None
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    report = {
        "machine": machine_description(device),
        "settings": {"data": args.data, "split": args.split, "sentences": len(references), "beam": args.beam,
                     "max_len_a": args.max_len_a, "max_len_b": args.max_len_b, "threads": args.threads,
                     "speed_sentences": min(args.speed_sentences, len(references)), "repeats": args.repeats,
                     "post_process": args.post_process},
        "models": models,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out_prefix)), exist_ok=True)
    with open(args.out_prefix + ".json", "w") as f:
        json.dump(report, f, indent=1)
    table = markdown_table(report)
    with open(args.out_prefix + ".md", "w") as f:
        f.write(table)
    plot(report, args.out_prefix + ".png")
    print(table, end="")
    logger.info(f"wrote {args.out_prefix}.json, .md and .png")


if __name__ == "__main__":
    main()
