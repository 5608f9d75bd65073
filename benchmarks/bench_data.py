"""Data pipeline alone: stream -> tokenize -> pack, in tokens/s, against what training consumes.

    python benchmarks/bench_data.py [--tokens 1000000]

run.py compares the background worker's rate with the tokens/s of each training configuration
(target: at least 20x, so the pipeline never starves a step).

Reads the corpus (the bundled sample's train.parquet, or a generated local .jsonl) through smolctl's
BlockStream and `batches()` exactly as `train()` does -- datasets' streaming reader, the
bundled SmolLM2 tokenizer, packing into 257-token blocks with resumable state -- both inline
(num_workers=0) and in the background worker train() uses (num_workers=1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, corpus, quiet_env, write_rows  # noqa: E402


def pipeline_tokens_per_s(path: Path, seq_len: int, batch_size: int, workers: int, max_tokens: int) -> float:
    """Steady-state tokens/s: timed from the first batch (start-up -- imports, tokenizer load,
    worker spawn -- is a one-off the trainer overlaps with building the model)."""
    from smolctl.data import BlockStream, DataSpec, batches

    stream = BlockStream(DataSpec.parse(str(path)), seq_len, batch_size, max_epochs=1)
    n, t0 = 0, None
    for batch, _ in batches(stream, workers):
        if t0 is None:
            t0 = time.perf_counter()
            continue
        n += batch.numel()
        if n >= max_tokens:
            break
    return n / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1_000_000, help="tokens to time")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    import os

    for k, v in quiet_env().items():
        os.environ.setdefault(k, v)
    path = corpus()
    rows = []
    speeds = {w: pipeline_tokens_per_s(path, 256, 8, w, args.tokens) for w in (0, 1)}
    for w, v in speeds.items():
        rows.append(Row("Data pipeline", f"stream → tokenize → pack, {'in a background worker' if w else 'inline'}",
                        v, "tok/s", note=f"{path.name}, B8×S256 blocks"))
    write_rows(rows, args.out, {"corpus": str(path), "tokens_per_s": speeds})


if __name__ == "__main__":
    main()
