"""`smolctl eval`: held-out loss and perplexity of any model on any data.

    smolctl eval --model runs/demo                        # the sample's held-out split
    smolctl eval --model smollm2-instruct --data heldout.jsonl --tokens 65536 --json
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass

import typer

from smolctl.cli.options import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, VerboseOpt, config_options
from smolctl.cli.registry import command
from smolctl.config import TrainConfig
from smolctl.errors import SmolctlError, note
from smolctl.schema import check_fields, from_flags, setting, setting_like, specs


@dataclass
class EvalOptions:
    """What eval scores, and how; each field is one of its flags."""

    data: str = setting("sample", "Like train's --data; default: the bundled sample's held-out split.")
    text_column: str = setting("text", "The text column.")
    # train's --eval-tokens, under the name eval has always had: one default, one check
    tokens: int = setting_like(TrainConfig, "eval_tokens", flag=("--tokens",))
    seq_len: int | None = setting(None, "Default: min(the model's context, 1024).", gt=0)
    batch_size: int = setting(4, "Sequences per forward pass.", gt=0)

    def __post_init__(self) -> None:
        check_fields(self, "", flags=True)


def register(app: typer.Typer) -> None:
    @command(app, name="eval", help="Held-out loss and perplexity of a model over N tokens.")
    @config_options(EvalOptions, tuple(specs(EvalOptions)), defaults={}, after="model")
    def eval_(
        model: ModelOpt = None,
        device: DeviceOpt = None,
        dtype: DtypeOpt = "auto",
        verbose: VerboseOpt = False,
        as_json: JsonOpt = False,
        **flags,
    ) -> None:
        if model is None:
            raise SmolctlError("eval needs --model", hint="Pass a run, checkpoint, HF directory or .gguf file")
        opts = from_flags(EvalOptions, flags)
        data, tokens, seq_len = opts.data, opts.tokens, opts.seq_len
        import torch

        from smolctl.data import DataSpec
        from smolctl.device import pick_device
        from smolctl.dtypes import GENERATE, canonical, pick_dtype
        from smolctl.loss import CausalLMLoss, evaluate
        from smolctl.sources import load

        dev = pick_device(device)
        dtype = canonical(dtype, GENERATE)
        spec = DataSpec.parse(data, opts.text_column, split="heldout")
        loaded = load(model, device=dev, dtype=torch.float32)
        seq_len = seq_len or min(loaded.cfg.max_seq_len, 1024)
        if seq_len > loaded.cfg.max_seq_len:
            raise SmolctlError(f"--seq-len {seq_len} exceeds the model's context ({loaded.cfg.max_seq_len})")
        # fp32 weights; the matmuls in the dtype picked (autocast), the loss in fp32
        say = note if verbose else None
        compute, why = pick_dtype(dtype, dev, "eval", opts.batch_size * seq_len, loaded.cfg, say)
        if say:
            say(f"Evaluating {model} ({why}; {dev})")
        t = time.perf_counter()
        with torch.autocast(torch.device(dev).type, dtype=compute, enabled=compute != torch.float32):
            loss, n = evaluate(CausalLMLoss(loaded.model), spec, seq_len=seq_len, batch_size=opts.batch_size,
                               tokens=tokens, device=dev, tokenizer=loaded.tokenizer)
        result = {"model": str(model), "data": spec.describe(), "tokens": n, "tokens_requested": tokens,
                  "seq_len": seq_len, "dtype": str(compute).removeprefix("torch."), "loss": loss,
                  "perplexity": math.exp(min(loss, 50)),
                  "seconds": round(time.perf_counter() - t, 2)}
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            whole = f" (all the data has; --tokens asked for {tokens:,})" if n < tokens else ""
            print(f"{model}: loss {loss:.4f}, perplexity {result['perplexity']:.2f}; "
                  f"scored {n:,} tokens{whole} of {spec.describe()} (seq len {seq_len})")
            print(f"{result['seconds']:.1f}s", file=sys.stderr)
