"""Options shared by several commands, written once (help text included), and the options made
from a config dataclass's field metadata (`config_options`: train and resume's flags)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional

import typer

from smolctl.schema import describe_default, specs

PresetOpt = Annotated[Optional[str], typer.Option(
    "--preset", "-p", help="A model preset: smollm2-135m (the seed's 135M) or tiny.", show_default=False)]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="A config file (JSON, YAML or TOML).", show_default=False)]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="A run directory, checkpoint or HF model directory, .gguf file, hub id, "
                          "or the name of a model imported with `smolctl import`.",
    show_default=False)]
DeviceOpt = Annotated[Optional[str], typer.Option(
    "--device", help="cpu, cuda, cuda:N, mps or auto (default: auto, the best available).", show_default=False)]
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
DtypeOpt = Annotated[str, typer.Option(
    "--dtype",
    help="auto, fp32, bf16 or fp16 (f32/f16 also accepted). auto: the one whose matmuls run fastest here, "
         "measured once per machine and cached (--verbose says which, and the figures).")]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Say on stderr what runs where (model, device, dtype), and the measured figures "
                            "behind an auto dtype or precision.")]
QuantizeOpt = Annotated[Literal["none", "int4"], typer.Option(
    "--quantize", help="int4: 4-bit weights (groups of 32, like GGUF Q4_1) for ~2x faster CPU decoding.")]


# -- options from config fields (train, resume, eval) ------------------------------------------

def config_options(cls: type, names: tuple[str, ...] | list[str]) -> Callable:
    """Give a command one option per field of `cls` named in `names` -- its flag, type and help,
    with the default shown, from the field's metadata (schema.setting) -- after its own
    parameters. Their values reach the command in its `**flags`, None where not given."""

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        made = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                  annotation=config_option(cls, name)) for name in names]
        fn.__signature__ = sig.replace(parameters=own + made)
        return fn

    return decorate


def config_option(cls: type, name: str, *decls: str):
    """The option for one field (named `decls`, default: the field's flag), None when not given."""
    spec = specs(cls)[name]
    decls = decls or spec.meta.get("flag") or (spec.flag(),)
    help = spec.meta["help"]
    if spec.default is not None:
        help = f"{help.rstrip('.')} (default {describe_default(spec)})."
    if spec.type is bool:
        decls = tuple(f"{d}/--no-{d[2:]}" for d in decls if d.startswith("--"))
    return Annotated[Optional[spec.type], typer.Option(*decls, help=help, show_default=False)]
