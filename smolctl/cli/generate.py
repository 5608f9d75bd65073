"""`smolctl generate`: continue a prompt, streaming the text as it is produced.

    smolctl generate "Once upon a time" --model runs/demo
    smolctl generate "The capital of France is" --model smollm2-instruct -n 20
    smolctl generate --prompt-file story.txt --model x.gguf --temperature 0.8 --top-p 0.9 --num-samples 3
    smolctl generate "Hi" --model smollm2-instruct --json     # text, token counts and timings as JSON

The continuation goes to stdout; loading notes and tokens/s go to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from smolctl.cli.options import DeviceOpt, DtypeOpt, ModelOpt, QuantizeOpt, VerboseOpt, config_options
from smolctl.cli.registry import command
from smolctl.errors import SmolctlError
from smolctl.fsutil import no_file
from smolctl.sampling import MAX_SEED, Sampling
from smolctl.schema import from_flags, specs

SAMPLING = tuple(specs(Sampling))  # every field of Sampling is a flag of generate (--stop included)


def register(app: typer.Typer) -> None:
    @command(app, help="Continue a prompt with a model, streaming the text.")
    @config_options(Sampling, SAMPLING, defaults={}, after="prompt_file")
    def generate(
        prompt: Annotated[Optional[str], typer.Argument(help="The text to continue.", show_default=False)] = None,
        model: ModelOpt = None,
        prompt_file: Annotated[Optional[Path], typer.Option(
            "--prompt-file", "-f", help="Read the prompt from a file (- for stdin).", show_default=False)] = None,
        num_samples: Annotated[int, typer.Option("--num-samples", help="How many continuations to generate.")] = 1,
        dtype: DtypeOpt = "auto",
        quantize: QuantizeOpt = "none",
        device: DeviceOpt = None,
        verbose: VerboseOpt = False,
        as_json: Annotated[bool, typer.Option(
            "--json", help="Print the text, token counts and timings as JSON (no streaming).")] = False,
        **flags,
    ) -> None:
        text = read_prompt(prompt, prompt_file)
        if num_samples < 1:
            raise SmolctlError(f"--num-samples must be at least 1, got {num_samples}")
        from smolctl.generation import Generation
        from smolctl.loading import load_for_generation

        sampling = from_flags(Sampling, flags)
        seed = sampling.seed
        loaded, load_s = load_for_generation(model, dtype, device, quantize, verbose)
        samples = []
        for i in range(num_samples):
            # sample i uses seed + i: each sample differs, and the whole run is reproducible
            s = sampling if seed is None else dataclasses.replace(sampling, seed=(seed + i) % (MAX_SEED + 1))
            gen = Generation(loaded.model, loaded.tokenizer, [text], s)
            if not as_json and num_samples > 1:
                print(f"{'' if i == 0 else chr(10)}--- sample {i + 1}/{num_samples} ---", flush=True)
            for step in gen:
                if not as_json:
                    sys.stdout.write(step.texts[0])
                    sys.stdout.flush()
            result = gen.results[0]
            if not as_json:
                print(flush=True)
                print(gen.stats_line(), file=sys.stderr)
            samples.append({"text": result.text, "finish_reason": result.finish_reason,
                            "new_token_ids": result.token_ids, **gen.stats.to_dict()})
        if as_json:
            print(json.dumps({"model": str(model), "path": str(loaded.path), "prompt": text,
                              "load_s": round(load_s, 3), "sampling": dataclasses.asdict(sampling),
                              "samples": samples}, indent=2, ensure_ascii=False))


MAX_PROMPT_BYTES = 64 << 20  # far beyond any model's context; a bigger --prompt-file is a mistake


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt: the argument, or --prompt-file's text (- for stdin), strictly UTF-8 (bytes that
    are not are refused in one line, not guessed at)."""
    if prompt is not None and prompt_file is not None:
        raise SmolctlError("give the prompt either as an argument or with --prompt-file, not both")
    if prompt_file is not None:
        from smolctl.artifacts import read_stdin, read_text

        if str(prompt_file) == "-":
            prompt = read_stdin("UTF-8 prompt")
        elif not prompt_file.is_file():
            raise SmolctlError(no_file("prompt file", prompt_file), hint="Check the path")
        else:
            prompt = read_text(prompt_file, "UTF-8 prompt file", limit=MAX_PROMPT_BYTES)
    if not prompt:
        raise SmolctlError("the prompt is empty",
                           hint='Give some text to continue: smolctl generate "Once upon a time"')
    return prompt
