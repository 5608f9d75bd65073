"""Start-up: `smolctl --help` against a hello-world Typer app, and `smolctl count-params`.

    python benchmarks/bench_startup.py [--repeats 5]

Each is a fresh subprocess (the interpreter start-up included), best of N wall times: the
minimum is the least disturbed by other work on a shared machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PYTHON, Row, write_rows  # noqa: E402

HELLO = '''import typer

app = typer.Typer()


@app.command()
def hello(name: str = "world") -> None:
    """Say hello."""
    print(f"Hello {name}")


if __name__ == "__main__":
    app()
'''


def best_of(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    smolctl = [PYTHON, "-m", "smolctl"]
    with tempfile.TemporaryDirectory() as tmp:
        hello = Path(tmp) / "hello.py"
        hello.write_text(HELLO)
        # Interleave the two so that a burst of load hits both alike.
        pairs = [(best_of([PYTHON, str(hello), "--help"], 1), best_of([*smolctl, "--help"], 1))
                 for _ in range(args.repeats)]
    hello_s, help_s = min(h for h, _ in pairs), min(s for _, s in pairs)
    count_s = best_of([*smolctl, "count-params"], max(2, args.repeats // 2))
    import_s = best_of([PYTHON, "-c", "import torch, transformers.models.llama.modeling_llama"], 2)
    rows = [
        Row("Start-up", "smolctl --help", help_s, "s", "hello-world Typer app --help", hello_s,
            lower_is_better=True, target=1.5, note=f"best of {args.repeats}"),
        Row("Start-up", "smolctl count-params (135M, meta device)", count_s, "s",
            "import torch + transformers' Llama", import_s, lower_is_better=True,
            note="builds the model on the meta device: the imports are the cost"),
    ]
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
