"""`smolctl export`: write a model as a Hugging Face directory or a GGUF file (llama.cpp, ollama).

    smolctl export --model runs/demo --out exports/demo-hf                  # HF, fp32
    smolctl export --model runs/demo --out exports/demo-hf --dtype bf16
    smolctl export --model runs/demo --out demo.q8_0.gguf --dtype q8_0      # GGUF (from the suffix)
    smolctl export --model runs/demo --format gguf --out demo.gguf --force  # replace an old file
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smolctl.cli.options import ModelOpt
from smolctl.cli.registry import command

FormatOpt = Annotated[Optional[str], typer.Option(
    "--format", "-f", help="hf or gguf (default: gguf when --out ends in .gguf, else hf).", show_default=False)]
OutOpt = Annotated[Optional[Path], typer.Option(
    "--out", "-o", help="The directory (hf) or .gguf file to write.", show_default=False)]
DtypeOpt = Annotated[Optional[str], typer.Option(
    "--dtype", help="hf: fp32 (default), fp16 or bf16. gguf: fp16 (default), fp32, bf16 or q8_0 "
                    "(f32/f16 also accepted).", show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]


def register(app: typer.Typer) -> None:
    @command(app, help="Export a model to a Hugging Face directory or a GGUF file (llama.cpp, ollama).")
    def export(model: ModelOpt = None, fmt: FormatOpt = None, out: OutOpt = None, dtype: DtypeOpt = None,
               force: ForceOpt = False) -> None:
        from rich.console import Console

        from smolctl.errors import SmolctlError
        from smolctl.export import export as run_export

        if model is None or out is None:
            raise SmolctlError("export needs --model and --out",
                               hint="e.g. smolctl export --model runs/demo --out demo-hf")
        fmt = fmt or ("gguf" if out.suffix.lower() == ".gguf" else "hf")
        with progress_bar(Console(stderr=True)) as report:
            result = run_export(model, fmt, out, dtype=dtype, force=force, progress=report)
        print_summary(result)


class progress_bar:
    """A Rich progress bar driven by export's `progress(what, done, total)` callback."""

    def __init__(self, console):
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                            TimeRemainingColumn(), console=console, transient=True)
        self.task = None

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()

    def __call__(self, what: str, done: int, total: int | None) -> None:
        if self.task is None:
            self.task = self.bar.add_task(what, total=total)
        self.bar.update(self.task, description=what, completed=done, total=total)


def print_summary(result) -> None:
    from rich.console import Console
    from rich.filesize import decimal
    from rich.table import Table

    table = Table()
    table.add_column("File")
    table.add_column("Bytes", justify="right")
    table.add_column("Size", justify="right")
    for path, size in result.files:
        table.add_row(path.name, f"{size:,}", decimal(size))
    if len(result.files) > 1:
        table.add_row("total", f"{result.total_bytes:,}", decimal(result.total_bytes), style="bold")
    p, name = str(result.path), result.path.name
    if result.format == "hf":
        how = [
            "transformers:  from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"               AutoModelForCausalLM.from_pretrained({p!r}); AutoTokenizer.from_pretrained({p!r})",
            f"llama.cpp:     smolctl export --model {p} --out {name}.gguf   (or llama.cpp's convert_hf_to_gguf.py)",
        ]
    else:
        how = [
            f"llama.cpp:     llama-cli -m {p}    (Python: llama_cpp.Llama(model_path={p!r}))",
            f"ollama:        printf 'FROM {result.path.resolve()}\\n' > Modelfile && ollama create {result.path.stem} -f Modelfile",
            f"transformers:  AutoModelForCausalLM.from_pretrained({str(result.path.parent)!r}, gguf_file={name!r})",
        ]
    console = Console()
    console.print(f"Exported [bold]{p}[/] ({result.format}, {result.dtype})", soft_wrap=True)
    console.print(table)
    console.print("Load it with:\n" + "\n".join(how), soft_wrap=True, markup=False, highlight=False)
