"""Where fairseq's decoding time goes: encoder, decoder embeddings, each decoder layer, output projection,
log-softmax, and the rest (beam search bookkeeping: candidate selection, finalisation, reordering the
incremental state), per model and batch size.

    python benchmarks/decode_profile.py --data work/multi30k-en-de-full/data-bin --split test \\
        --model teacher=work/.../teacher/checkpoint_last.pt --model student=work/.../checkpoint_last.pt \\
        --batch-sizes 1,32 --sentences 200 --threads 1 --out benchmarks/results/decode_profile

Each part is timed with forward hooks around the modules (and a wrapper around the log-softmax) while
``fairseq_kd.inference.FairseqTranslator`` decodes the first ``--sentences`` sentences of the split,
sorted by length, once to warm up and once measured. Prints a Markdown table; writes OUT.json and OUT.md.
"""
import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch

from fairseq_kd.evaluate import setup_task, source_pieces
from fairseq_kd.inference import DecodingOptions, FairseqTranslator, translate_all


class PartTimer:
    """Seconds spent inside named modules; nested parts are subtracted from the part around them later."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self._start = {}

    def wrap_module(self, name, module):
        def before(*_):
            self._start[name] = time.perf_counter()

        def after(*_):
            self.seconds[name] += time.perf_counter() - self._start[name]
            self.calls[name] += 1

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def wrap_function(self, name, owner, attribute):
        function = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            return result

        setattr(owner, attribute, timed)


def instrument(model):
    timer = PartTimer()
    # fairseq's generator calls the encoder's and decoder's forward directly, past module hooks
    timer.wrap_function("encoder", model.encoder, "forward")
    timer.wrap_function("decoder", model.decoder, "forward")
    for i, layer in enumerate(model.decoder.layers):
        timer.wrap_module(f"decoder layer {i}", layer)
    timer.wrap_module("output projection", model.decoder.output_projection)
    timer.wrap_function("log-softmax", model, "get_normalized_probs")
    return timer


def profile(translator, timer, sources, batch_size):
    translate_all(translator, sources, batch_size)  # warm-up
    timer.seconds.clear()
    timer.calls.clear()
    start = time.perf_counter()
    outputs = translate_all(translator, sources, batch_size)
    total = time.perf_counter() - start
    seconds = dict(timer.seconds)
    layers = sum(v for k, v in seconds.items() if k.startswith("decoder layer"))
    parts = {
        "encoder": seconds["encoder"],
        "decoder embeddings": seconds["decoder"] - layers - seconds["output projection"],
        **{k: v for k, v in seconds.items() if k.startswith("decoder layer")},
        "output projection": seconds["output projection"],
        "log-softmax": seconds["log-softmax"],
    }
    parts["search bookkeeping (the rest)"] = total - seconds["encoder"] - seconds["decoder"] - seconds["log-softmax"]
    return {"batch_size": batch_size, "sentences": len(sources), "seconds": round(total, 3),
            "decoder_steps": timer.calls["decoder"], "output_tokens": sum(len(o) + 1 for o in outputs),
            "parts_ms_per_sentence": {k: round(1000 * v / len(sources), 3) for k, v in parts.items()},
            "parts_share": {k: round(v / total, 4) for k, v in parts.items()},
            "ms_per_decoder_step": round(1000 * seconds["decoder"] / timer.calls["decoder"], 3)}


def markdown(results):
    lines = ["| model | batch | part | ms per sentence | share |", "|---|---:|---|---:|---:|"]
    for r in results:
        for part, ms in r["parts_ms_per_sentence"].items():
            lines.append(f"| {r['name']} | {r['batch_size']} | {part} | {ms:.2f} | {r['parts_share'][part]:.1%} |")
        lines.append(f"| {r['name']} | {r['batch_size']} | **total** ({r['decoder_steps']} decoder steps,"
                     f" {1000 * r['seconds'] / r['sentences']:.1f} ms/sentence) |"
                     f" {1000 * r['seconds'] / r['sentences']:.2f} | 100% |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task_args = argparse.Namespace(data=args.data, split=args.split, source_lang=None, target_lang=None)
    sources = source_pieces(setup_task(task_args), args.split)[: args.sentences]
    results = []
    for item in args.model:
        name, _, path = item.partition("=")
        translator = FairseqTranslator(path, args.data, DecodingOptions(beam=args.beam))
        timer = instrument(translator.model)
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            results.append({"name": name, **profile(translator, timer, sources, batch_size)})
            print(f"{name} batch {batch_size}: {results[-1]['seconds']:.1f} s", file=sys.stderr)
    table = markdown(results)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"settings": vars(args), "results": results}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(table)
    print(table, end="")


if __name__ == "__main__":
    main()
