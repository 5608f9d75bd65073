"""`smolctl count-params`: the parameter breakdown, counted from the model built on the meta device.

    smolctl count-params                     # SmolLM2-135M: 134,515,008
    smolctl count-params --preset tiny --json
"""

from __future__ import annotations

import json

import typer

from smolctl.cli.options import ConfigOpt, JsonOpt, ModelOpt, PresetOpt
from smolctl.cli.registry import command


def register(app: typer.Typer) -> None:
    @command(app, name="count-params", help="Count parameters by component (embedding, layers, norm, head).")
    def count_params(preset: PresetOpt = None, config: ConfigOpt = None, model: ModelOpt = None,
                     as_json: JsonOpt = False) -> None:
        from smolctl.model import param_breakdown, skeleton
        from smolctl.sources import resolve_model_config

        cfg = resolve_model_config(preset, config, model)
        counts = param_breakdown(skeleton(cfg), cfg.num_layers)
        if as_json:
            print(json.dumps({"model": cfg.name, **counts}, indent=2))
            return
        from rich.console import Console

        Console().print(breakdown_table(cfg, counts))


def human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"~{n / size:.0f}{unit}" if n / size >= 100 else f"~{n / size:.3g}{unit}"
    return str(n)


def breakdown_table(cfg, counts):
    from rich.table import Table

    h, layer, n = cfg.hidden_size, counts["per_layer"], counts["num_layers"]
    table = Table(title=f"{cfg.name}: {counts['total']:,} parameters ({human(counts['total'])})",
                  title_justify="left")
    table.add_column("Component")
    table.add_column("Shape")
    table.add_column("Parameters", justify="right")
    vocab, dim = counts["embedding_shape"]
    table.add_row("embed_tokens", f"{vocab} × {dim}", f"{counts['embedding']:,}")
    if layer:
        table.add_section()
        for name, k in layer["attention"].items():
            table.add_row(f"  {name}", f"{h} → {k // h}", f"{k:,}")
        table.add_row("  attention", "", f"{layer['attention_total']:,}", style="bold")
        for name, k in layer["mlp"].items():
            shape = f"{k // h} → {h}" if name == "down_proj" else f"{h} → {k // h}"
            table.add_row(f"  {name}", shape, f"{k:,}")
        table.add_row("  MLP", "", f"{layer['mlp_total']:,}", style="bold")
        table.add_row("  RMSNorm × 2", f"2 × {h}", f"{layer['norms']:,}")
        table.add_row("per decoder layer", "", f"{layer['total']:,}", style="bold")
        table.add_section()
        table.add_row(f"{n} decoder layers", f"{n} × {layer['total']:,}", f"{counts['layers_total']:,}")
    table.add_row("final norm", f"{counts['final_norm']}", f"{counts['final_norm']:,}")
    table.add_row("lm_head", "tied with embed_tokens" if counts["tied"] else f"{h} → {vocab}",
                  f"{counts['lm_head']:,}")
    table.add_section()
    table.add_row("Total", "", f"{counts['total']:,} ({human(counts['total'])})", style="bold")
    return table
