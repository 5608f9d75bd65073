"""Options shared by several commands, written once (help text included)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

PresetOpt = Annotated[Optional[str], typer.Option(
    "--preset", "-p", help="A model preset: smollm2-135m (the seed's 135M) or tiny.", show_default=False)]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="A config file (JSON, YAML or TOML).", show_default=False)]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="A run directory, checkpoint or HF model directory, .gguf file, hub id, "
                          "or the name of a model imported with `smolctl import`.",
    show_default=False)]
DeviceOpt = Annotated[Optional[str], typer.Option(
    "--device", help="cpu, cuda, cuda:1, mps... (default: the best available).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

# -- generation (generate, chat) ---------------------------------------------------------------
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate per reply.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 = greedy.")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Sample from the k most likely tokens; 0 = off.")]
TopPOpt = Annotated[float, typer.Option(
    "--top-p", help="Sample from the smallest set holding this probability; 1 = off.")]
MinPOpt = Annotated[float, typer.Option(
    "--min-p", help="Drop tokens below min-p x the top token's probability; 0 = off.")]
RepetitionPenaltyOpt = Annotated[float, typer.Option(
    "--repetition-penalty", help="Above 1 discourages tokens already in the context; 1 = off.")]
SampleSeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", help="Random seed for sampling (default: a fresh one each run).", show_default=False)]
DtypeOpt = Annotated[Literal["auto", "fp32", "bf16"], typer.Option(
    "--dtype",
    help="Weights' dtype; auto: bf16 where the device computes it fast, else fp32.")]
QuantizeOpt = Annotated[Literal["none", "int4"], typer.Option(
    "--quantize", help="int4: 4-bit weights (groups of 32, like GGUF Q4_1) for ~2x faster CPU decoding.")]
