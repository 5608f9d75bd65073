"""`smolctl inspect`: print the module tree and the transformers config of a model.

    smolctl inspect                          # the seed's SmolLM2-135M (built on the meta device)
    smolctl inspect --preset tiny
    smolctl inspect --config my-model.yaml
    smolctl inspect --model runs/demo        # any --model source: run, checkpoint, HF dir, .gguf, imported name
"""

from __future__ import annotations

import typer

from smolctl.cli.options import ConfigOpt, ModelOpt, PresetOpt
from smolctl.cli.registry import command


def register(app: typer.Typer) -> None:
    @command(app, help="Print a model's module tree and config (no weights are allocated).")
    def inspect(preset: PresetOpt = None, config: ConfigOpt = None, model: ModelOpt = None) -> None:
        from smolctl.config import resolve_model_config
        from smolctl.model import build_model

        cfg = resolve_model_config(preset, config, model)
        print(build_model(cfg, device="meta"))
        print()
        print("Config:", cfg.to_hf())
