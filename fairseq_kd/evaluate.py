"""``fairseq-kd-eval``: quality, size, speed and memory of a teacher and its students, fairseq checkpoints
and CTranslate2 exports side by side.

    fairseq-kd-eval data-bin --checkpoints teacher=teacher.pt student=student.pt student-int8=student-ct2 \\
        --split test --reference raw/test.de --post-process sentencepiece --beam 5 \\
        --batch-sizes 1,32,128 --threads 1 --out-prefix results/eval

writes ``results/eval.json``, ``results/eval.md``, ``results/eval.png`` (BLEU against throughput, point
area proportional to parameters) and each model's translations, ``results/eval.NAME.txt``. A model is a
fairseq checkpoint or a directory written by fairseq-kd-export; the first is the reference for compression
ratio and BLEU retention. Each model is measured in a fresh process, one after the other, so peak memory is
its own and no two models compete for the CPU.

Decoding follows fairseq-generate's rules for both backends (``fairseq_kd.inference``), with its default
length limits unless ``--max-len-a/--max-len-b`` say otherwise. Quality: sacrebleu BLEU (with the length
ratio), chrF and TER of the whole split, detokenized with ``--post-process``, against ``--reference`` (the
raw reference file; default: the split's binarized targets, detokenized the same way). An export is also
compared with the fairseq checkpoint it came from when that is in the same run: the share of sentences
translated identically and the BLEU difference. Speed: the first ``--speed-sentences`` sentences, sorted
by length, in batches of each size, one warm-up pass, then the median of ``--repeats`` timed passes;
sentences/s and generated target tokens/s (end of sentence included); torch and CTranslate2 use
``--threads`` threads. Memory: peak resident set size of the process (CPU) or peak allocated memory
(GPU, fairseq models).
"""
import argparse
import json
import logging
import multiprocessing
import os
import platform
import queue as queues
import resource
import statistics
import sys
import time
import traceback

import fairseq
import torch
from fairseq import options, tasks, utils
from fairseq.data import data_utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from sacrebleu.metrics import BLEU, CHRF, TER

from fairseq_kd.checkpoints import sha256
from fairseq_kd.errors import FairseqKDError
from fairseq_kd.inference import (
    CTranslate2Translator,
    DecodingOptions,
    FairseqTranslator,
    check_export_vocabulary,
    read_export_manifest,
    translate_all,
)

logger = logging.getLogger("fairseq_kd.evaluate")


def quality_scores(hypotheses, references):
    """Corpus BLEU (with its length ratio), chrF and TER with their sacrebleu signatures."""
    scores = {}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF()), ("ter", TER())):
        result = metric.corpus_score(hypotheses, [references])
        scores[name] = round(result.score, 2)
        scores[f"{name}_signature"] = str(metric.get_signature())
        if name == "bleu":
            scores["length_ratio"] = round(result.sys_len / max(result.ref_len, 1), 3)
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
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="NAME=MODEL",
                        help="models to compare, each a fairseq checkpoint or a fairseq-kd-export directory; the"
                        " first is the reference (usually the teacher)")
    parser.add_argument("--split", default="test", help="split to decode (default: test)")
    parser.add_argument("--source-lang", default=None)
    parser.add_argument("--target-lang", default=None)
    parser.add_argument("--reference", default=None,
                        help="raw (detokenized) reference file, one line per sentence of the split")
    parser.add_argument("--post-process", default="sentencepiece",
                        help="how fairseq detokenizes output: sentencepiece, subword_nmt, none, ...")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--max-len-a", type=float, default=0.0, help="as fairseq-generate (default: 0)")
    parser.add_argument("--max-len-b", type=int, default=200, help="as fairseq-generate (default: 200)")
    parser.add_argument("--lenpen", type=float, default=1.0, help="as fairseq-generate (default: 1)")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per batch of the quality pass")
    parser.add_argument("--batch-sizes", default="1,32,128", help="comma-separated batch sizes timed")
    parser.add_argument("--speed-sentences", type=int, default=128, help="sentences decoded per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per batch size (median kept)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads of torch and CTranslate2")
    parser.add_argument("--cpu", action="store_true", help="use the CPU even when a GPU is available")
    parser.add_argument("--out-prefix", required=True,
                        help="writes PREFIX.json, PREFIX.md, PREFIX.png and PREFIX.NAME.txt")
    return parser


def parse_checkpoints(items):
    named = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise FairseqKDError(f"--checkpoints takes NAME=MODEL items, got {item!r}")
        if not os.path.exists(path):
            raise FairseqKDError(
                f"--checkpoints: no such file {path!r} (for {name}); give a checkpoint .pt file or a directory"
                " written by fairseq-kd-export"
            )
        if os.path.isdir(path):
            read_export_manifest(path)
        named.append((name, path))
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise FairseqKDError(f"--checkpoints: each model needs its own name, got {' '.join(names)}")
    return named


def check_arguments(args):
    try:
        batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
    except ValueError:
        raise FairseqKDError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    if not batch_sizes:
        raise FairseqKDError(f"--batch-sizes must name at least one batch size, got {args.batch_sizes!r}")
    for option, value in (("--batch-size", args.batch_size), ("--repeats", args.repeats), ("--threads", args.threads),
                          ("--speed-sentences", args.speed_sentences), ("batch size", min(batch_sizes))):
        if value < 1:
            raise FairseqKDError(f"{option} must be >= 1, got {value}")
    decoding = DecodingOptions(beam=args.beam, max_len_a=args.max_len_a, max_len_b=args.max_len_b, lenpen=args.lenpen)
    decoding.check()
    out_dir = os.path.dirname(os.path.abspath(args.out_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise FairseqKDError(f"--out-prefix {args.out_prefix}: cannot create {out_dir} ({e.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise FairseqKDError(f"--out-prefix {args.out_prefix}: {out_dir} is not writable; choose another place")
    return batch_sizes, decoding


def setup_task(args):
    """A ``translation`` task with the split loaded."""
    fairseq_args = [args.data, "--task", "translation", "--gen-subset", args.split]
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
    return task


def load_references(args, task):
    dataset = task.dataset(args.split)
    if args.reference is None:
        return [task.tgt_dict.string(dataset[i]["target"], args.post_process) for i in range(len(dataset))]
    try:
        with open(args.reference, encoding="utf-8") as f:
            references = [line.rstrip("\n") for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise FairseqKDError(f"--reference {args.reference}: cannot read it ({e}); give the raw reference file") from None
    if len(references) != len(dataset):
        raise FairseqKDError(
            f"--reference {args.reference} has {len(references)} lines but split '{args.split}' has"
            f" {len(dataset)} sentences; give the raw reference file of that split"
        )
    return references


def source_pieces(task, split):
    """The split's source sentences as subword pieces, without end of sentence."""
    dataset = task.dataset(split)
    return [task.src_dict.string(dataset[i]["source"]).split() for i in range(len(dataset))]


def build_translator(args, path, task, decoding, use_cuda):
    """The backend for ``path``: an exported directory runs in CTranslate2, a checkpoint in fairseq."""
    device = "cuda" if use_cuda else "cpu"
    if os.path.isdir(path):
        check_export_vocabulary(path, task.src_dict, task.tgt_dict)
        return CTranslate2Translator(path, decoding, threads=args.threads, device=device)
    return FairseqTranslator(path, args.data, decoding, device=device)


def model_size(path, translator):
    """Parameters and sizes: ``(total, embedding, weights bytes, file bytes)``."""
    if translator.backend == "ctranslate2":
        manifest = translator.manifest
        files = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        return manifest["params"], manifest["embedding_params"], os.path.getsize(os.path.join(path, "model.bin")), files
    total = sum(p.numel() for p in translator.model.parameters())
    embedding = sum(p.numel() for name, p in translator.model.named_parameters()
                    if "embed_tokens" in name or "embed_positions" in name)
    weights = sum(p.numel() * p.element_size() for p in translator.model.parameters())
    return total, embedding, weights, os.path.getsize(path)


def evaluate_model(args, name, path, batch_sizes, decoding, references):
    """Everything measured about one model, in the current process."""
    torch.set_num_threads(args.threads)
    use_cuda = torch.cuda.is_available() and not args.cpu
    task = setup_task(args)
    translator = build_translator(args, path, task, decoding, use_cuda)
    if use_cuda and translator.backend == "fairseq":
        torch.cuda.reset_peak_memory_stats()
    total, embedding, weight_bytes, file_bytes = model_size(path, translator)
    sources = source_pieces(task, args.split)

    logger.info(f"{name}: translating {len(sources)} sentences of '{args.split}' with {translator.backend}"
                f" (beam {args.beam})")
    hypotheses = translate_all(translator, sources, args.batch_size)
    outputs = [data_utils.post_process(" ".join(pieces), args.post_process) for pieces in hypotheses]
    record = {"name": name, "model": path, "backend": translator.backend,
              "quantization": translator.manifest["quantization"] if translator.backend == "ctranslate2" else "float32",
              "vmap": translator.backend == "ctranslate2" and translator.use_vmap,
              # what an export came from, to compare it with that checkpoint (peer a is what fairseq decodes)
              "source": (f"{translator.manifest['sha256']}:{translator.manifest['peer'] or 'a'}"
                         if translator.backend == "ctranslate2" else f"{sha256(path)}:a"),
              "params": total, "embedding_params": embedding,
              "non_embedding_params": total - embedding, "weights_mb": round(weight_bytes / 2**20, 2),
              "file_mb": round(file_bytes / 2**20, 2), **quality_scores(outputs, references), "speed": []}

    timed_sources = sources[: args.speed_sentences]
    for batch_size in batch_sizes:
        timings = []
        for repeat in range(args.repeats + 1):  # the first pass warms up
            start = time.perf_counter()
            timed = translate_all(translator, timed_sources, batch_size)
            if use_cuda:
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - start)
        seconds = statistics.median(timings[1:])
        tokens = sum(len(pieces) + 1 for pieces in timed)  # + end of sentence
        record["speed"].append({"batch_size": batch_size, "sentences": len(timed_sources), "seconds": round(seconds, 3),
                                "sentences_per_s": round(len(timed_sources) / seconds, 2),
                                "tokens_per_s": round(tokens / seconds, 1)})
        logger.info(f"{name}: batch {batch_size}: {len(timed_sources) / seconds:.1f} sentences/s"
                    f" (median of {args.repeats})")
    if use_cuda and translator.backend == "fairseq":
        record["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        record["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return record, outputs


def _child(args, name, path, batch_sizes, decoding, references, queue):
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout, force=True)
    try:
        queue.put(evaluate_model(args, name, path, batch_sizes, decoding, references))
    except FairseqKDError as e:
        queue.put(e)
    except Exception:  # the parent waits on the queue: hand every failure back
        queue.put(RuntimeError(f"evaluating {name} failed:\n{traceback.format_exc()}"))


def run_in_child(context, name, target_args):
    """``evaluate_model`` in a fresh process; a process that dies without answering (killed for memory,
    crashed in native code) is reported by name with its exit code."""
    queue = context.Queue()
    child = context.Process(target=_child, args=(*target_args, queue))
    child.start()
    while True:
        try:
            result = queue.get(timeout=2)
            break
        except queues.Empty:
            if not child.is_alive():
                reason = f"killed by signal {-child.exitcode}" if child.exitcode < 0 else f"exit code {child.exitcode}"
                raise FairseqKDError(
                    f"evaluating {name}: its process ended without a result ({reason}; signal 9 is usually the"
                    " out-of-memory killer); the models before it are saved"
                )
    child.join()
    if isinstance(result, Exception):
        raise result
    return result


def compare_exports(models, outputs):
    """Each export beside the fairseq checkpoint (and peer) it came from, when that is in the run."""
    for m in models:
        if m["backend"] != "ctranslate2":
            continue
        origin = next((o for o in models if o["backend"] == "fairseq" and o["source"] == m["source"]), None)
        if origin is None:
            continue
        same = sum(a == b for a, b in zip(outputs[m["name"]], outputs[origin["name"]]))
        m["compared_with"] = origin["name"]
        m["identical_share"] = round(same / len(outputs[m["name"]]), 4)
        m["bleu_difference"] = round(m["bleu"] - origin["bleu"], 2)


def markdown_table(report):
    batch_sizes = [s["batch_size"] for s in report["models"][0]["speed"]]
    header = ["model", "backend", "params", "compression", "weights MB", "BLEU", "length ratio", "chrF", "TER",
              "BLEU retention"]
    header += [f"sent/s b{b}" for b in batch_sizes] + ["peak memory MB"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for m in report["models"]:
        retention = "n/a" if m["bleu_retention"] is None else f"{m['bleu_retention']:.1%}"
        backend = m["backend"] if m["backend"] == "fairseq" else f"ct2 {m['quantization']}" + (" vmap" if m["vmap"] else "")
        row = [m["name"], backend, f"{m['params'] / 1e6:.2f} M", f"{m['compression']:.2f}x", f"{m['weights_mb']:.1f}",
               f"{m['bleu']:.2f}", f"{m['length_ratio']:.3f}", f"{m['chrf']:.2f}", f"{m['ter']:.2f}", retention]
        row += [f"{s['sentences_per_s']:.1f}" for s in m["speed"]] + [f"{m['peak_memory_mb']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    exports = [m for m in report["models"] if "compared_with" in m]
    if exports:
        lines += ["", "| export | compared with | identical translations | BLEU difference |", "|---|---|---:|---:|"]
        lines += [f"| {m['name']} | {m['compared_with']} | {m['identical_share']:.1%} | {m['bleu_difference']:+.2f} |"
                  for m in exports]
    machine = report["machine"]
    settings = report["settings"]
    lines += [
        "",
        f"{settings['split']} ({settings['sentences']} sentences), beam {settings['beam']}, length limit"
        f" {settings['max_len_a']} x source + {settings['max_len_b']}; speed: first {settings['speed_sentences']}"
        f" sentences sorted by length, median of {settings['repeats']} after a warm-up pass;"
        f" {machine['device']}, {machine['cpu']}, {settings['threads']} threads; torch {machine['torch']},"
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
        ax.scatter(speed, m["bleu"], s=600 * m["params"] / largest, alpha=0.6,
                   marker="o" if m["backend"] == "fairseq" else "s")
        ax.annotate(f"{m['name']} ({m['params'] / 1e6:.1f} M)", (speed, m["bleu"]), textcoords="offset points",
                    xytext=(6, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"sentences/s, batch {batch_size}, beam {report['settings']['beam']} (circles fairseq,"
                  " squares CTranslate2)")
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
    batch_sizes, decoding = check_arguments(args)
    task = setup_task(args)
    references = load_references(args, task)
    context = multiprocessing.get_context("spawn")
    models, outputs = [], {}
    for name, path in named:
        record, outputs[name] = run_in_child(context, name, (args, name, path, batch_sizes, decoding, references))
        models.append(record)
        with open(f"{args.out_prefix}.{name}.txt", "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in outputs[name])
    reference = models[0]
    for m in models:
        m["compression"] = reference["params"] / m["params"]
        m["bleu_retention"] = m["bleu"] / reference["bleu"] if reference["bleu"] > 0 else None
    compare_exports(models, outputs)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    report = {
        "machine": machine_description(device),
        "settings": {"data": args.data, "split": args.split, "sentences": len(references), "beam": args.beam,
                     "max_len_a": args.max_len_a, "max_len_b": args.max_len_b, "lenpen": args.lenpen,
                     "threads": args.threads, "speed_sentences": min(args.speed_sentences, len(references)),
                     "repeats": args.repeats, "post_process": args.post_process},
        "models": models,
    }
    with open(args.out_prefix + ".json", "w") as f:
        json.dump(report, f, indent=1)
    table = markdown_table(report)
    with open(args.out_prefix + ".md", "w") as f:
        f.write(table)
    plot(report, args.out_prefix + ".png")
    print(table, end="")
    logger.info(f"wrote {args.out_prefix}.json, .md, .png and the translations, {args.out_prefix}.NAME.txt")


if __name__ == "__main__":
    main()
