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
        from smolctl.model import skeleton
        from smolctl.sources import resolve_model_config

        cfg = resolve_model_config(preset, config, model)
        print(module_tree(skeleton(cfg), cfg.num_layers))
        print()
        print("Config:", cfg.to_hf())


def module_tree(model, num_layers: int) -> str:
    """The module tree of a `skeleton`, its decoder layers counted as the config says (torch
    prints a run of alike layers as `(0-1): 2 x LlamaDecoderLayer(`)."""
    import re

    tree = str(model)
    if num_layers < 2:
        return tree
    return re.sub(r"\(0-1\): 2 x ", f"(0-{num_layers - 1}): {num_layers} x ", tree, count=1)
