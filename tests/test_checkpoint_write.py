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
