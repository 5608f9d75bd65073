import json
import subprocess
import sys
import textwrap

import pytest


def test_count_params_table(cli):
    r = cli("count-params")
    assert r.exit_code == 0, r.output
    for figure in ("28,311,552", "331,776", "110,592", "884,736", "2,654,208", "1,152", "3,540,096",
                   "106,202,880", "134,515,008"):
        assert figure in r.output


def test_count_params_json_untied(cli, tmp_path):
    (tmp_path / "m.yaml").write_text("preset: tiny\ntie_embeddings: false\n")
    r = cli("count-params", "--config", tmp_path / "m.yaml", "--json")
    assert r.exit_code == 0, r.output
    counts = json.loads(r.output)
    assert counts["lm_head"] == counts["embedding"] > 0 and not counts["tied"]


def test_inspect_preset_prints_tree_and_config(cli):
    r = cli("inspect", "--preset", "smollm2-135m")
    assert r.exit_code == 0, r.output
    assert "(0-29): 30 x LlamaDecoderLayer(" in r.output
    assert "Config: LlamaConfig {" in r.output and '"num_key_value_heads": 3' in r.output


def test_inspect_hf_directory(cli, tmp_path):
    from smolctl.config import ModelConfig

    ModelConfig.from_preset("tiny").to_hf().save_pretrained(tmp_path)
    r = cli("inspect", "--model", tmp_path)
    assert r.exit_code == 0 and "(0-3): 4 x LlamaDecoderLayer(" in r.output


@pytest.mark.parametrize("args, words", [
    (["count-params", "--preset", "nope"], "unknown preset 'nope'. Valid presets: smollm2-135m, tiny"),
    (["inspect", "--config", "/no/such.yaml"], "config file not found"),
    (["inspect", "--model", "/no/such/dir"], "--model /no/such/dir: no such file or directory"),
    (["inspect", "--preset", "tiny", "--model", "x"], "only one of --preset, --config and --model"),
])
def test_bad_input_is_one_line_exit_2(cli, args, words):
    r = cli(*args)
    assert r.exit_code == 2
    assert r.output.strip().count("\n") == 0 and words in r.output
    assert "Traceback" not in r.output


def test_bad_input_in_a_real_process(tmp_path):
    (tmp_path / "m.json").write_text('{"hidden_size": 100, "num_heads": 3}')
    p = subprocess.run([sys.executable, "-m", "smolctl", "inspect", "--config", str(tmp_path / "m.json")],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip() == ("Error: invalid model config: hidden_size 100 is not divisible by num_heads 3. "
                                "Pick sizes where hidden_size % num_heads == 0")


def test_model_dir_without_config(cli, tmp_path):
    r = cli("inspect", "--model", tmp_path)
    assert r.exit_code == 2 and "is neither a run, a checkpoint nor an HF model directory" in r.output


@pytest.mark.parametrize("argv", [["--help"], ["count-params", "--help"], ["inspect", "--help"]])
def test_help_imports_neither_torch_nor_transformers(argv):
    code = textwrap.dedent(f"""
        import sys
        from smolctl.cli import app
        try:
            app({argv!r})
        except SystemExit:
            pass
        heavy = [m for m in ("torch", "transformers", "datasets", "accelerate") if m in sys.modules]
        print("HEAVY", heavy)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in p.stdout, p.stdout + p.stderr


def add_entry_point(monkeypatch, name: str, value: str) -> None:
    """Make `importlib.metadata` report one more `smolctl.commands` entry point, as an install would."""
    import importlib.metadata as md

    from smolctl.cli import registry

    real = md.entry_points

    def entry_points(**kw):
        eps = list(real(**kw))
        if kw.get("group") == registry.GROUP:
            eps.append(md.EntryPoint(name, value, registry.GROUP))
        return eps

    monkeypatch.setattr(registry, "entry_points", entry_points)


def test_outside_plugin_registers_through_the_entry_point_group(monkeypatch):
    """An installed package's `smolctl.commands` entry point adds a command, like the built-ins."""
    import types

    from typer.testing import CliRunner

    from smolctl.cli import make_app, registry
    from smolctl.errors import SmolctlError

    plugin = types.ModuleType("smolctl_hello_plugin")

    def register(app):
        @registry.command(app, help="Say hello.")
        def hello(name: str = "world", fail: bool = False):
            if fail:
                raise SmolctlError("no greeting today", hint="Try tomorrow")
            print(f"hello {name}")

    plugin.register = register
    monkeypatch.setitem(sys.modules, "smolctl_hello_plugin", plugin)
    add_entry_point(monkeypatch, "hello", "smolctl_hello_plugin:register")
    app = make_app()
    runner = CliRunner()
    r = runner.invoke(app, ["hello", "--name", "smol"])
    assert r.exit_code == 0 and r.output == "hello smol\n"
    r = runner.invoke(app, ["hello", "--fail"])
    assert r.exit_code == 2 and r.output == "Error: no greeting today. Try tomorrow\n"
    assert "inspect" in runner.invoke(app, ["--help"]).output  # built-ins came the same way


def test_broken_plugin_warns_but_cli_still_works(monkeypatch, capsys):
    from typer.testing import CliRunner

    from smolctl.cli import make_app

    add_entry_point(monkeypatch, "broken", "no_such_module_xyz:register")
    app = make_app()
    assert "plugin 'broken'" in capsys.readouterr().err
    r = CliRunner().invoke(app, ["count-params", "--preset", "tiny", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["total"] > 0


def test_python_dash_m_and_version():
    p = subprocess.run([sys.executable, "-m", "smolctl", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("smolctl ")


def test_inspect_and_count_params_take_every_model_source(cli, tiny_chat_gguf, models_dir):
    """A .gguf file (its metadata only) and an imported name resolve like --model does elsewhere."""
    import json

    from smolctl.sources import import_model

    path, model, cfg = tiny_chat_gguf
    want = sum(p.numel() for p in model.parameters())
    r = cli("count-params", "--model", path, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["total"] == want
    import_model(path)
    r = cli("count-params", "--model", "tiny-chat", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["total"] == want
    r = cli("inspect", "--model", "tiny-chat")
    assert r.exit_code == 0 and f'"num_hidden_layers": {cfg.num_layers},' in r.output
