import hashlib
import os

import pytest
import torch
from safetensors.torch import load_file, save

from smolctl import safetensors_io as st_io


@pytest.mark.parametrize("tensors, metadata", [
    ({"w": torch.randn(4, 3), "norm": torch.ones(3)}, {"format": "pt"}),  # weights, optimizer moments
    ({"torch": torch.get_rng_state()}, None),  # uint8
    ({"buffer": torch.randint(0, 9, (3, 5)), "0.step": torch.tensor(2.0)}, None),  # int64, a 0-dim tensor
    ({"b": torch.ones(2, 3), "a": torch.zeros(3, dtype=torch.bfloat16), "c": torch.tensor(5),
      "d": torch.zeros(5, dtype=torch.bool)}, None),  # mixed element sizes: aligned like safetensors
])
def test_write_tensors_writes_exactly_what_safetensors_would(tmp_path, tensors, metadata):
    path = tmp_path / "x.safetensors"
    st_io.write_tensors(path, tensors, metadata)
    assert path.read_bytes() == save(tensors, metadata=metadata)
    back = load_file(str(path))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_the_manifest_digest_is_computed_while_writing_and_matches_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    st_io.write_tensors(path, {"w": torch.randn(64, 64)})
    on_disk = hashlib.sha256(path.read_bytes()).hexdigest()
    assert st_io._DIGESTS[os.path.abspath(path)][2] == on_disk
    assert st_io.file_sha256(path) == on_disk
    st_io.write_file(path, b"changed")  # rewritten: the remembered digest follows the new bytes
    assert st_io.file_sha256(path) == hashlib.sha256(b"changed").hexdigest()


def test_a_save_refuses_non_finite_weights_and_leaves_nothing(tmp_path):
    """checkpoint.save's sequence checks the weights before writing any: NaN weights raise the
    caller's error (naming the weight), and neither the checkpoint nor its staging directory remains."""
    from conftest import MICRO

    from smolctl import checkpoint as ckpt_io
    from smolctl.config import ModelConfig
    from smolctl.distributed import accelerator
    from smolctl.errors import SmolctlError
    from smolctl.loss import CausalLMLoss
    from smolctl.model import build_model

    cfg = ModelConfig(**{**ModelConfig.from_preset("tiny").to_dict(), **MICRO})
    model = build_model(cfg, device="cpu")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    final = ckpt_io.step_dir(tmp_path / "run", 2)
    final.parent.mkdir(parents=True)
    with pytest.raises(SmolctlError, match=r"not finite: model\.norm\.weight"):
        ckpt_io.save(final, accelerator("cpu", mixed_precision="no"), CausalLMLoss(model),
                     torch.optim.AdamW(model.parameters()),
                     cfg, meta=dict, data_state={},
                     not_finite=lambda name: SmolctlError(f"not finite: {name}"))
    assert list(final.parent.iterdir()) == []
