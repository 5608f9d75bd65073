"""Options shared by several commands, written once (help text included)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

PresetOpt = Annotated[Optional[str], typer.Option(
    "--preset", "-p", help="A model preset: smollm2-135m (the seed's 135M) or tiny.", show_default=False)]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="A config file (JSON, YAML or TOML).", show_default=False)]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="A run directory, checkpoint directory, HF model directory, hub id or .gguf file.",
    show_default=False)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
DeviceOpt = Annotated[Optional[str], typer.Option(
    "--device", help="cpu, cuda, cuda:1, mps... (default: the best available).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
