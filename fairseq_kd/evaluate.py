"""``fairseq-kd-eval``: quality, size, speed and memory of a teacher and its students, fairseq checkpoints
and CTranslate2 exports side by side.

    fairseq-kd-eval data-bin --checkpoints teacher=teacher.pt student=student.pt student-int8=student-ct2 \\
        --split test,valid --reference raw/test.de,raw/valid.de --post-process sentencepiece --beam 5 \\
        --batch-sizes 1,32,128 --threads 1 --out-prefix results/eval

writes ``results/eval.json``, ``results/eval.md``, ``results/eval.png`` (BLEU against throughput, point
area proportional to parameters) and each model's translations, ``results/eval.NAME.SPLIT.txt``. A model is
a fairseq checkpoint or a directory written by fairseq-kd-export; the first is the reference for compression
ratio and BLEU retention. Each model is measured in a fresh process, one after the other, so peak memory is
its own and no two models compete for the CPU. The first split is the one the table, retention and speed
are about; the table adds the BLEU of the others.

Reports of separate runs (e.g. one model each, as the recipes evaluate) become one table with
``fairseq-kd-eval --merge A.json B.json ... --out-prefix results/all``: same settings required, the first
model the reference.

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
import hashlib
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
from fairseq import options, utils
from fairseq.data import data_utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from sacrebleu.metrics import BLEU, CHRF, TER

from fairseq_kd.checkpoints import check_language_pair, data_language_pairs, load_split, setup_data_task, sha256
from fairseq_kd.errors import FairseqKDError, make_writable_directory, overwritten_input
from fairseq_kd.inference import (
    CTranslate2Translator,
    DecodingOptions,
    FairseqTranslator,
    check_export_vocabulary,
    check_post_process,
    read_export_manifest,
    requested_language_pair,
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
    parser.add_argument("data", nargs="?", help="fairseq data-bin the models were trained on")
    parser.add_argument("--checkpoints", nargs="+", metavar="NAME=MODEL",
                        help="models to compare, each a fairseq checkpoint or a fairseq-kd-export directory; the"
                        " first is the reference (usually the teacher)")
    parser.add_argument("--merge", nargs="+", metavar="REPORT",
                        help="instead of decoding: one table from the PREFIX.json reports of earlier runs")
    parser.add_argument("--split", default="test",
                        help="comma-separated splits to decode (default: test); the first is the table's")
    parser.add_argument("--source-lang", default=None)
    parser.add_argument("--target-lang", default=None)
    parser.add_argument("--reference", default=None,
                        help="raw (detokenized) reference files, comma-separated, one per split, a line per sentence")
    parser.add_argument("--post-process", default="sentencepiece",
                        help="how fairseq detokenizes output: sentencepiece, subword_nmt, none, ...")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--max-len-a", type=float, default=0.0, help="as fairseq-generate (default: 0)")
    parser.add_argument("--max-len-b", type=int, default=200, help="as fairseq-generate (default: 200)")
    parser.add_argument("--lenpen", type=float, default=1.0, help="as fairseq-generate (default: 1)")
    parser.add_argument("--iter-decode-max-iter", type=int, default=10,
                        help="non-autoregressive checkpoints: refinement iterations, as fairseq-generate (default: 10)")
    parser.add_argument("--iter-decode-with-beam", type=int, default=1,
                        help="non-autoregressive checkpoints: length candidates, as fairseq-generate (default: 1)")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per batch of the quality pass")
    parser.add_argument("--batch-sizes", default="1,32,128", help="comma-separated batch sizes timed")
    parser.add_argument("--no-speed", action="store_true", help="measure quality and size only")
    parser.add_argument("--speed-sentences", type=int, default=128, help="sentences decoded per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per batch size (median kept)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads of torch and CTranslate2")
    parser.add_argument("--cpu", action="store_true", help="use the CPU even when a GPU is available")
    parser.add_argument("--out-prefix", required=True,
                        help="writes PREFIX.json, PREFIX.md, PREFIX.png and PREFIX.NAME.SPLIT.txt")
    return parser


def parse_checkpoints(items):
    named = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise FairseqKDError(f"--checkpoints takes NAME=MODEL items, got {item!r}")
        if "/" in name or name in (".", ".."):
            raise FairseqKDError(
                f"--checkpoints: the name {name!r} goes into file names (PREFIX.NAME.SPLIT.txt); give one without '/'"
            )
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
    """``(splits, references, batch sizes, decoding options)`` from the arguments, each checked."""
    if not args.data or not args.checkpoints:
        raise FairseqKDError("give the data directory and --checkpoints NAME=MODEL ... (or --merge REPORT ...)")
    splits = args.split.split(",")
    if not all(splits) or len(set(splits)) != len(splits):
        raise FairseqKDError(f"--split must name distinct splits separated by commas, got {args.split!r}")
    references = args.reference.split(",") if args.reference else [None] * len(splits)
    if len(references) != len(splits):
        raise FairseqKDError(
            f"--reference names {len(references)} files for {len(splits)} splits ({args.split}); give one per split"
        )
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
    decoding = DecodingOptions(beam=args.beam, max_len_a=args.max_len_a, max_len_b=args.max_len_b, lenpen=args.lenpen,
                               iter_decode_max_iter=args.iter_decode_max_iter,
                               iter_decode_with_beam=args.iter_decode_with_beam)
    decoding.check()
    check_out_prefix(args.out_prefix)
    return splits, references, ([] if args.no_speed else batch_sizes), decoding


def check_out_prefix(out_prefix):
    """PREFIX.json, .md and .png can be written, before anything is decoded or merged."""
    make_writable_directory("--out-prefix", out_prefix, os.path.dirname(os.path.abspath(out_prefix)))
    for suffix in (".json", ".md", ".png"):
        if os.path.isdir(out_prefix + suffix):
            raise FairseqKDError(f"--out-prefix {out_prefix}: {out_prefix + suffix} is a directory; choose another prefix")


def setup_task(args, splits):
    """A ``translation`` task with the splits loaded."""
    requested_language_pair(args.source_lang, args.target_lang)
    directory = utils.split_paths(args.data)[0]
    pairs = data_language_pairs(directory) if not args.source_lang and os.path.isdir(directory) else []
    if len(pairs) > 1:  # fairseq would take whichever the directory lists first
        raise FairseqKDError(
            f"{args.data} holds several language pairs ({', '.join('-'.join(p) for p in pairs)}); name one with"
            " --source-lang and --target-lang"
        )
    fairseq_args = [args.data, "--task", "translation"]
    for option, value in (("--source-lang", args.source_lang), ("--target-lang", args.target_lang)):
        if value:
            fairseq_args += [option, value]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_generation_parser(), fairseq_args))
    task = setup_data_task(cfg.task, args.data)
    for split in splits:
        load_split(task, split, args.data, task.cfg.source_lang, task.cfg.target_lang, "--split")
    return task


def load_references(args, task, split, path):
    dataset = task.dataset(split)
    if path is None and dataset[0]["target"] is None:
        raise FairseqKDError(
            f"--split {split}: {args.data} has no {task.cfg.target_lang} side of it (binarized with --only-source?);"
            " give the raw references with --reference"
        )
    if path is None:
        # as fairseq-generate writes them: an <unk> escaped, so that a hypothesis's <unk> cannot match it
        return [task.tgt_dict.string(dataset[i]["target"], args.post_process, escape_unk=True) for i in range(len(dataset))]
    try:
        with open(path, encoding="utf-8") as f:
            references = [line.rstrip("\n") for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise FairseqKDError(f"--reference {path}: cannot read it ({e}); give the raw reference file") from None
    if len(references) != len(dataset):
        raise FairseqKDError(
            f"--reference {path} has {len(references)} lines but split '{split}' has"
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
    langs = (task.cfg.source_lang, task.cfg.target_lang)
    if os.path.isdir(path):
        manifest = read_export_manifest(path)
        check_language_pair(f"export {path}", (manifest["source_lang"], manifest["target_lang"]), langs)
        check_export_vocabulary(path, task.src_dict, task.tgt_dict)
        if manifest.get("post_process", args.post_process) != args.post_process:
            raise FairseqKDError(
                f"export {path} writes {manifest['subwords']['kind']} pieces, which --post-process"
                f" {manifest['post_process']} joins, not {args.post_process}; evaluate with --post-process"
                f" {manifest['post_process']}"
            )
        return CTranslate2Translator(path, decoding, threads=args.threads, device=device)
    return FairseqTranslator(path, args.data, decoding, device=device, langs=langs)


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
    """Everything measured about one model, in the current process: ``(record, {split: translations})``;
    ``references`` maps each split to its reference lines, the first split is timed."""
    torch.set_num_threads(args.threads)
    use_cuda = torch.cuda.is_available() and not args.cpu
    splits = list(references)
    task = setup_task(args, splits)
    translator = build_translator(args, path, task, decoding, use_cuda)
    if use_cuda and translator.backend == "fairseq":
        torch.cuda.reset_peak_memory_stats()
    total, embedding, weight_bytes, file_bytes = model_size(path, translator)
    outputs, scores = {}, {}
    for split in splits:
        sources = source_pieces(task, split)
        logger.info(f"{name}: translating {len(sources)} sentences of '{split}' with {translator.backend}"
                    f" (beam {args.beam})")
        hypotheses = translate_all(translator, sources, args.batch_size)
        if split == splits[0]:  # the table's split, decoded first: its iterations, not those of every split
            steps = list(getattr(translator, "refinement_steps", []))
        outputs[split] = [data_utils.post_process(" ".join(pieces), args.post_process) for pieces in hypotheses]
        scores[split] = {**quality_scores(outputs[split], references[split]), "sentences": len(sources)}
    record = {"name": name, "model": path, "backend": translator.backend,
              "quantization": translator.manifest["quantization"] if translator.backend == "ctranslate2" else "float32",
              "vmap": translator.backend == "ctranslate2" and translator.use_vmap,
              # what an export came from, to compare it with that checkpoint (peer a is what fairseq decodes)
              "source": (f"{translator.manifest['sha256']}:{translator.manifest['peer'] or 'a'}"
                         if translator.backend == "ctranslate2" else f"{sha256(path)}:a"),
              "params": total, "embedding_params": embedding,
              "non_embedding_params": total - embedding, "weights_mb": round(weight_bytes / 2**20, 2),
              "file_mb": round(file_bytes / 2**20, 2), **scores, "speed": []}
    if steps:  # a non-autoregressive model: its mean refinement iterations per sentence
        record["refinement_steps"] = round(sum(steps) / len(steps), 2)

    timed_sources = source_pieces(task, splits[0])[: args.speed_sentences]
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
    except torch.OutOfMemoryError:
        timed = f", timed in batches of up to {max(batch_sizes)} (--batch-sizes)" if batch_sizes else ""
        queue.put(FairseqKDError(
            f"evaluating {name}: out of GPU memory, decoding in batches of {args.batch_size} (--batch-size){timed};"
            " give smaller batches, or --cpu"))
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
                    " out-of-memory killer)"
                )
    child.join()
    if isinstance(result, Exception):
        raise result
    return result


def compare_exports(models, outputs, split):
    """Each export beside the fairseq checkpoint (and peer) it came from, when that is in the report: on
    ``split``, the share of identical translations (``outputs``: name -> translations) and the BLEU
    difference."""
    for m in models:
        if m["backend"] != "ctranslate2":
            continue
        origin = next((o for o in models if o["backend"] == "fairseq" and o["source"] == m["source"]), None)
        if origin is None:
            continue
        same = sum(a == b for a, b in zip(outputs[m["name"]], outputs[origin["name"]]))
        m["compared_with"] = origin["name"]
        m["identical_share"] = round(same / len(outputs[m["name"]]), 4)
        m["bleu_difference"] = round(m[split]["bleu"] - origin[split]["bleu"], 2)


def markdown_table(report):
    settings, machine = report["settings"], report["machine"]
    primary, others = settings["splits"][0], settings["splits"][1:]
    header = ["model", "backend", "params", "compression", "weights MB", "BLEU", "length ratio", "chrF", "TER",
              "BLEU retention"]
    non_autoregressive = any("refinement_steps" in m for m in report["models"])
    header += [f"BLEU {split}" for split in others] + [f"sent/s b{b}" for b in settings["batch_sizes"]]
    header += ["peak memory MB"] + (["iterations"] if non_autoregressive else [])
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for m in report["models"]:
        scores = m[primary]
        retention = "n/a" if m["bleu_retention"] is None else f"{m['bleu_retention']:.1%}"
        backend = m["backend"] if m["backend"] == "fairseq" else f"ct2 {m['quantization']}" + (" vmap" if m["vmap"] else "")
        row = [m["name"], backend, f"{m['params'] / 1e6:.2f} M", f"{m['compression']:.2f}x", f"{m['weights_mb']:.1f}",
               f"{scores['bleu']:.2f}", f"{scores['length_ratio']:.3f}", f"{scores['chrf']:.2f}", f"{scores['ter']:.2f}",
               retention]
        row += [f"{m[split]['bleu']:.2f}" for split in others]
        row += [f"{s['sentences_per_s']:.1f}" for s in m["speed"]] + [f"{m['peak_memory_mb']:.0f}"]
        if non_autoregressive:
            row.append(f"{m['refinement_steps']:.2f}" if "refinement_steps" in m else "autoregressive")
        lines.append("| " + " | ".join(row) + " |")
    exports = [m for m in report["models"] if "compared_with" in m]
    if exports:
        lines += ["", "| export | compared with | identical translations | BLEU difference |", "|---|---|---:|---:|"]
        lines += [f"| {m['name']} | {m['compared_with']} | {m['identical_share']:.1%} | {m['bleu_difference']:+.2f} |"
                  for m in exports]
    refinement = (f"; non-autoregressive models: at most {settings['iter_decode_max_iter']} refinement iterations,"
                  f" {settings['iter_decode_with_beam']} length candidates (iterations: the mean per sentence)"
                  if non_autoregressive else "")
    speed = (f"; speed: first {settings['speed_sentences']} sentences sorted by length, median of"
             f" {settings['repeats']} after a warm-up pass" if settings["batch_sizes"] else "")
    lines += [
        "",
        f"{primary} ({settings['sentences'][primary]} sentences), beam {settings['beam']}, length limit"
        f" {settings['max_len_a']} x source + {settings['max_len_b']}{refinement}{speed};"
        f" {machine['device']}, {machine['cpu']},"
        f" {settings['threads']} threads; torch {machine['torch']}, fairseq {machine['fairseq']}.",
        f"{report['models'][0][primary]['bleu_signature']}",
    ]
    return "\n".join(lines) + "\n"


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = report["settings"]
    primary, batch_size = settings["splits"][0], max(settings["batch_sizes"])
    fig, ax = plt.subplots(figsize=(6, 4))
    largest = max(m["params"] for m in report["models"])
    for m in report["models"]:
        speed = next(s["sentences_per_s"] for s in m["speed"] if s["batch_size"] == batch_size)
        ax.scatter(speed, m[primary]["bleu"], s=600 * m["params"] / largest, alpha=0.6,
                   marker="o" if m["backend"] == "fairseq" else "s")
        ax.annotate(f"{m['name']} ({m['params'] / 1e6:.1f} M)", (speed, m[primary]["bleu"]),
                    textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"sentences/s, batch {batch_size}, beam {settings['beam']} (circles fairseq, squares CTranslate2)")
    ax.set_ylabel(f"BLEU ({primary})")
    ax.set_title(f"quality vs throughput ({report['machine']['device']}, {settings['threads']} threads)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report, outputs, out_prefix):
    """Ratios against the first model, export comparisons, then PREFIX.json, .md and (with speed) .png;
    ``outputs`` maps each model to its translations of the first split."""
    primary = report["settings"]["splits"][0]
    reference = report["models"][0]
    for m in report["models"]:
        m["param_ratio"] = round(m["params"] / reference["params"], 4)
        m["compression"] = reference["params"] / m["params"]
        m["bleu_retention"] = m[primary]["bleu"] / reference[primary]["bleu"] if reference[primary]["bleu"] > 0 else None
    compare_exports(report["models"], outputs, primary)
    with open(out_prefix + ".json", "w") as f:
        json.dump(report, f, indent=1)
    table = markdown_table(report)
    with open(out_prefix + ".md", "w") as f:
        f.write(table)
    if report["settings"]["batch_sizes"]:
        plot(report, out_prefix + ".png")
    elif os.path.exists(out_prefix + ".png"):  # an earlier timed run's, not of these results
        os.remove(out_prefix + ".png")
    print(table, end="")


# settings that must agree for reports to share a table: the data, those of decoding, and of timing when timed
COMPARABLE = ("language_pair", "references", "splits", "sentences", "beam", "max_len_a", "max_len_b", "lenpen",
              "iter_decode_max_iter", "iter_decode_with_beam", "post_process", "batch_sizes")
COMPARABLE_SPEED = ("threads", "speed_sentences", "repeats")


def translations_path(report_path, stored):
    """Where a report's translation file is. Reports name it relative to their own directory, so that a merge
    run from anywhere finds it; earlier reports named it relative to the directory they were written from."""
    beside = os.path.join(os.path.dirname(report_path), stored)
    return beside if os.path.exists(beside) or not os.path.exists(stored) else stored


def read_translations(path):
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    except OSError as e:
        raise FairseqKDError(f"--merge: cannot read the translations {path} ({e.strerror}); evaluate again") from None


def check_report(report):
    """What a merged table reads of a report, there (a ValueError naming what is missing)."""
    splits = report["settings"]["splits"]
    if not isinstance(report["models"], list) or not report["models"]:
        raise ValueError("no models")
    for model in report["models"]:
        if not isinstance(model, dict):
            raise ValueError(f"a model that is {model!r}")
        missing = [field for field in ("name", "backend", "params", "translations") if field not in model]
        missing += [f"{split} BLEU" for split in splits if "bleu" not in (model.get(split) or {})]
        if missing:
            raise ValueError(f"model {model.get('name', '?')!r} lacks {', '.join(missing)}")


def merge(paths, out_prefix):
    """One report from the reports of earlier runs, their models in order."""
    check_out_prefix(out_prefix)
    for written in (out_prefix + ".json", out_prefix + ".md"):
        read = overwritten_input(written, paths)
        if read:
            raise FairseqKDError(f"--out-prefix {out_prefix}: the merged report would overwrite its input {read};"
                                 " choose another prefix")
    reports = []
    for path in paths:
        try:
            with open(path) as f:
                reports.append(json.load(f))
            check_report(reports[-1])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FairseqKDError(f"--merge: {path} is not a fairseq-kd-eval report ({e}); give PREFIX.json files") from None
    first = reports[0]["settings"]
    for path, report in zip(paths[1:], reports[1:]):
        keys = COMPARABLE + (COMPARABLE_SPEED if first.get("batch_sizes") else ())
        differ = [key for key in keys if report["settings"].get(key) != first.get(key)]
        if differ:
            raise FairseqKDError(
                f"--merge: {path} was evaluated with other settings than {paths[0]} ({', '.join(differ)}); evaluate"
                " the models with the same options"
            )
        if first.get("batch_sizes") and report["machine"] != reports[0]["machine"]:
            raise FairseqKDError(
                f"--merge: {path} was timed on another machine or software than {paths[0]} ({report['machine']} vs"
                f" {reports[0]['machine']}), whose speeds one table cannot compare; time the models on one machine,"
                " or evaluate them with --no-speed"
            )
    models = [m for report in reports for m in report["models"]]
    names = [m["name"] for m in models]
    if len(set(names)) != len(names):
        raise FairseqKDError(f"--merge: the reports name some models twice ({' '.join(names)}); give each once")
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    for path, report in zip(paths, reports):  # named relative to the merged report from now on
        for model in report["models"]:
            model["translations"] = {split: os.path.relpath(translations_path(path, stored), out_dir)
                                     for split, stored in model["translations"].items()}
    primary = first["splits"][0]
    outputs = {}
    if any(m["backend"] == "ctranslate2" for m in models):  # compared with their checkpoints
        outputs = {m["name"]: read_translations(os.path.join(out_dir, m["translations"][primary])) for m in models}
    write_report({"machine": reports[0]["machine"], "settings": first, "models": models}, outputs, out_prefix)


def main(argv=None):
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout, force=True)
    args = get_parser().parse_args(argv)
    if args.merge:
        if args.data or args.checkpoints:
            raise FairseqKDError("--merge combines earlier reports and evaluates nothing: evaluate the new models in a"
                                 " run of their own, then merge its report with the others")
        merge(args.merge, args.out_prefix)
        return
    named = parse_checkpoints(args.checkpoints or [])
    splits, reference_files, batch_sizes, decoding = check_arguments(args)
    task = setup_task(args, splits)
    check_post_process("--post-process", args.post_process, task.tgt_dict)
    references = {split: load_references(args, task, split, path) for split, path in zip(splits, reference_files)}
    # each model in a fresh process forked from a server that has imported fairseq once: no import per model
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fairseq_kd.evaluate"])
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    report = {
        "machine": machine_description(device),
        "settings": {"data": args.data, "language_pair": [task.cfg.source_lang, task.cfg.target_lang],
                     "references": {s: hashlib.sha256("\n".join(r).encode("utf-8")).hexdigest() for s, r in references.items()},
                     "splits": splits, "sentences": {s: len(r) for s, r in references.items()},
                     "beam": args.beam, "max_len_a": args.max_len_a, "max_len_b": args.max_len_b, "lenpen": args.lenpen,
                     "iter_decode_max_iter": args.iter_decode_max_iter, "iter_decode_with_beam": args.iter_decode_with_beam,
                     "threads": args.threads, "batch_sizes": batch_sizes,
                     "speed_sentences": min(args.speed_sentences, len(references[splits[0]])),
                     "repeats": args.repeats, "post_process": args.post_process},
        "models": [],
    }
    models, outputs = report["models"], {}
    for name, path in named:
        try:
            record, translations = run_in_child(context, name, (args, name, path, batch_sizes, decoding, references))
        except Exception as e:  # a refusal, or a failure such as running out of GPU memory
            if not models:
                raise
            write_report(report, outputs, args.out_prefix)  # what was measured stays, in a report of its own
            if isinstance(e, FairseqKDError):
                raise FairseqKDError(f"{e} (the report of the models before it: {args.out_prefix}.json)") from None
            logger.error(f"evaluating {name} failed; the report of the models before it: {args.out_prefix}.json")
            raise
        record["translations"] = {}  # relative to the report's directory
        for split, lines in translations.items():
            path = f"{args.out_prefix}.{name}.{split}.txt"
            record["translations"][split] = os.path.basename(path)
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in lines)
        models.append(record)
        outputs[name] = translations[splits[0]]
    write_report(report, outputs, args.out_prefix)
    logger.info(f"wrote {args.out_prefix}.json, .md{'' if args.no_speed else ', .png'} and the translations,"
                f" {args.out_prefix}.NAME.SPLIT.txt")


if __name__ == "__main__":
    main()
