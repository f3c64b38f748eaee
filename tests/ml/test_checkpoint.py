"""Loading HeartMuLa folders: official names and shapes, shards, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.ml.models.checkpoint import INDEX_NAME, CheckpointError
from shared.ml.models.heartmula import (
    FLAVORS,
    HeartMuLa,
    HeartMuLaConfig,
    heartmula_folder,
    load_heartmula,
)
from shared.ml.models.tiny import random_heartmula
from tests.support.reference import official_shapes

OFFICIAL_CONFIG = {
    "backbone_flavor": "llama-3B",
    "decoder_flavor": "llama-300M",
    "text_vocab_size": 128256,
    "audio_vocab_size": 8197,
    "audio_num_codebooks": 8,
    "muq_dim": 512,
}


def test_official_config_builds_every_official_tensor_name_and_shape() -> None:
    config = HeartMuLaConfig.from_dict(OFFICIAL_CONFIG)
    assert config.backbone == FLAVORS["llama-3B"] and config.decoder == FLAVORS["llama-300M"]
    with torch.device("meta"):
        model = HeartMuLa(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_shapes("heartmula_keys.txt")


def test_unknown_flavor_without_sizes_is_refused() -> None:
    with pytest.raises(ValueError, match="backbone_flavor 'llama-9B'"):
        HeartMuLaConfig.from_dict({**OFFICIAL_CONFIG, "backbone_flavor": "llama-9B"})


def test_tiny_folder_loads_with_the_weights_it_was_written_with(tiny_model_dir: Path) -> None:
    folder = tiny_model_dir / "HeartMuLa-oss-tiny"
    assert (folder / INDEX_NAME).is_file() and len(list(folder.glob("*.safetensors"))) == 2
    model = load_heartmula(folder, torch.device("cpu"), torch.float32)
    written = random_heartmula(model.config, seed=0)
    for key, value in written.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_single_file_without_index_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    src = tiny_model_dir / "HeartMuLa-oss-tiny"
    tensors = {}
    for shard in src.glob("*.safetensors"):
        tensors |= load_file(shard)
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    model = load_heartmula(tmp_path, torch.device("cpu"), torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.audio_head.float(), tensors["audio_head"].bfloat16().float())


def _copy_with(src: Path, dst: Path, edit: str, key: str) -> None:
    shutil.copytree(src, dst)
    index = json.loads((dst / INDEX_NAME).read_text())
    shard = dst / index["weight_map"][key]
    tensors = load_file(shard)
    if edit == "drop":
        del tensors[key]
    else:
        tensors[key] = tensors[key][:-1]
    save_file(tensors, shard)


@pytest.mark.parametrize(
    ("edit", "key", "message"),
    [
        (
            "drop",
            "decoder.layers.1.mlp.w2.weight",
            "missing tensor.*decoder.layers.1.mlp.w2.weight",
        ),
        ("shrink", "codebook0_head.weight", r"codebook0_head.weight has shape \(8196, 128\)"),
    ],
)
def test_broken_checkpoint_names_the_tensor(
    tiny_model_dir: Path, tmp_path: Path, edit: str, key: str, message: str
) -> None:
    folder = tmp_path / "HeartMuLa-oss-tiny"
    _copy_with(tiny_model_dir / "HeartMuLa-oss-tiny", folder, edit, key)
    with pytest.raises(CheckpointError, match=message):
        load_heartmula(folder, torch.device("cpu"), torch.float32)


def test_index_listing_a_missing_shard_is_reported(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir / "HeartMuLa-oss-tiny", folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_heartmula(folder, torch.device("cpu"), torch.float32)


def test_model_version_selects_the_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert heartmula_folder(tiny_model_dir) == tiny_model_dir / "HeartMuLa-oss-tiny"
    assert heartmula_folder(tiny_model_dir, "3B") == tiny_model_dir / "HeartMuLa-oss-3B"
    with pytest.raises(CheckpointError, match="found: none"):
        heartmula_folder(tmp_path)
