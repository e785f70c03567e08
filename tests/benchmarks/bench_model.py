"""Real-model benchmark: one 128-wordpiece sentence through MiniLM-L6's 6 layers, side by side.

Ours: the numpy BERT encoder (service/core/model) with every attention in our kernel, every
layer's and head's weights returned (what /v1/tokens with "model": "minilm-l6" computes). Theirs:
`transformers`' BertModel on the same files, eager attention with output_attentions=True (the
same output), and SDPA without the weights (torch's fastest path, for scale). Same process,
same thread count, interleaved rounds; medians. Prints the time, the share of our time spent in
our kernel, and the ratios; writes tests/benchmarks/results/model.{json,md}.

    make bench-model            # QUICK=1 for a short run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import BertModel  # noqa: E402

from service.core.model import get_model  # noqa: E402
from service.core.model.package import locate  # noqa: E402

RESULTS = Path(__file__).parent / "results"
THREADS = 2
WORDPIECES = 128
TEXT = (
    "Attention lets every word of a sentence look at every other word, and a trained model "
    "learns which ones matter: some heads follow the previous token, some find the verb of a "
    "subject, many rest on the separator when they have nothing to do. "
)


def sentence(model, n: int) -> str:  # noqa: ANN001 - the loaded SentenceModel
    """A text of exactly n wordpieces ([CLS] and [SEP] included), cut at a word boundary."""
    words = (TEXT * 8).split()
    for end in range(1, len(words) + 1):
        text = " ".join(words[:end])
        length = len(model.tokenize(text))
        if length == n:
            return text
        if length > n:
            break
    raise RuntimeError(f"no prefix of the text has exactly {n} wordpieces")


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    reps = 5 if args.quick else 20
    torch.set_num_threads(THREADS)

    model = get_model("minilm-l6")
    text = sentence(model, WORDPIECES)
    enc = model.tokenize(text)
    all_layers = range(model.num_layers)
    folder = str(locate(model.spec))
    eager = BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    sdpa = BertModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    inputs = {
        "input_ids": torch.from_numpy(enc.ids)[None],
        "token_type_ids": torch.from_numpy(enc.type_ids)[None],
        "attention_mask": torch.ones(1, len(enc), dtype=torch.long),
    }

    shares: list[float] = []

    def ours() -> None:
        out = model.run([enc], layers=all_layers, num_threads=THREADS)
        shares.append(out.kernel_ms / out.elapsed_ms)

    def theirs_eager() -> None:
        with torch.inference_mode():
            eager(**inputs, output_attentions=True)

    def theirs_sdpa() -> None:
        with torch.inference_mode():
            sdpa(**inputs)

    rounds: dict[str, list[float]] = {"ours": [], "eager": [], "sdpa": []}
    for _ in range(3):  # interleaved, so drift on a shared machine hits every side alike
        rounds["ours"].append(median_ms(ours, reps))
        rounds["eager"].append(median_ms(theirs_eager, reps))
        rounds["sdpa"].append(median_ms(theirs_sdpa, reps))
    ms = {name: statistics.median(v) for name, v in rounds.items()}
    share = statistics.median(shares)
    row = {
        "case": f"MiniLM-L6, 1 sentence of {len(enc)} wordpieces, 6 layers x 12 heads",
        "threads": THREADS,
        "ours_ms": round(ms["ours"], 2),
        "kernel_share": round(share, 3),
        "kernel_ms": round(ms["ours"] * share, 2),
        "transformers_eager_ms": round(ms["eager"], 2),
        "transformers_sdpa_ms": round(ms["sdpa"], 2),
        "ratio_vs_eager": round(ms["ours"] / ms["eager"], 3),
        "ratio_vs_sdpa": round(ms["ours"] / ms["sdpa"], 3),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or '?'}",
        "torch": torch.__version__,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "model.json").write_text(json.dumps(row, indent=2) + "\n")
    table = (
        "| case | ours (ms) | in our kernel | transformers eager + weights (ms) | ours / eager "
        "| transformers SDPA, no weights (ms) | ours / SDPA |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {row['case']} | {row['ours_ms']} | {share:.0%} ({row['kernel_ms']} ms) "
        f"| {row['transformers_eager_ms']} | {row['ratio_vs_eager']} "
        f"| {row['transformers_sdpa_ms']} | {row['ratio_vs_sdpa']} |\n"
    )
    (RESULTS / "model.md").write_text(table)
    print(table)
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
