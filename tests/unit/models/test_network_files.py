"""Network files given on the command line (``network=``, ``tswitch.network``) are data, never code.

Every crafted file below is a real file on disk: text, empty, a PNG image, a truncated network file, a
raw pickle that runs code and a torch zip archive holding an object that runs code. The code payloads
create a marker file when unpickled (shown live with full unpickling on a copy); reading them as
network files must name the file and the reason, and leave no marker.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from knn_cm.models import EDMPrecond, NotANetworkFileError, SongUNet, load_network, save_network

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import sample  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CreatesMarker:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a crafted file could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def tiny_network_file(path: Path) -> Path:
    torch.manual_seed(0)
    network = EDMPrecond(SongUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=16,
                                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]))
    return save_network(path, network)


def crafted_files(folder: Path, marker: Path) -> dict[str, Path]:
    """name -> a file that is not a network file (two of them run code when fully unpickled)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / f"{name}.pt"
             for name in ("text", "empty", "png", "truncated", "raw_pickle", "torch_zip_code")}
    files["text"].write_text("step: 1000\nnot a network\n")
    files["empty"].write_bytes(b"")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(files["png"], format="PNG")
    whole = tiny_network_file(folder / "whole.pt").read_bytes()
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    files["raw_pickle"].write_bytes(pickle.dumps({"format": "knn_cm.network.v1", "x": CreatesMarker(marker)}))
    torch.save({"format": "knn_cm.network.v1", "state_dict": {}, "x": CreatesMarker(marker)}, files["torch_zip_code"])
    return files


def test_crafted_payloads_are_live(tmp_path):
    """The payloads used below really run code when a loader unpickles them fully (so the tests mean something)."""
    for name in ("raw_pickle", "torch_zip_code"):
        live = tmp_path / f"live-{name}"
        files = crafted_files(tmp_path / f"copy-{name}", live)
        if name == "raw_pickle":
            pickle.loads(files[name].read_bytes())
        else:
            torch.load(files[name], weights_only=False)
        assert live.exists()


REASONS = {"text": "text file", "empty": "empty", "png": "PNG image", "truncated": "truncated or corrupt",
           "raw_pickle": "raw Python pickle", "torch_zip_code": "could run code"}


@pytest.mark.parametrize("name", sorted(REASONS))
def test_load_network_names_the_file_and_the_reason(tmp_path, name):
    marker = tmp_path / "marker"
    path = crafted_files(tmp_path / "files", marker)[name]
    with pytest.raises(NotANetworkFileError) as error:
        load_network(path)
    message = str(error.value)
    assert message.startswith(f"not a knn-cm network file: {path} (") and REASONS[name] in message
    assert "weights_only=False" not in message  # never torch's advice to unpickle fully
    assert not marker.exists()


def test_other_torch_files_are_not_network_files(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    torch.save({"format": "knn_cm.network.v1", "state_dict": {"model.x": torch.zeros(1)}, "network_class": "SongUNet",
                "songunet_kwargs": {"img_resolution": 8}, "precond_class": "os.system", "precond_kwargs": {}},
               tmp_path / "foreign-class.pt")
    with pytest.raises(NotANetworkFileError, match=r"plain.pt \(format None instead of 'knn_cm.network.v1'"):
        load_network(tmp_path / "plain.pt")
    with pytest.raises(NotANetworkFileError, match="precond_class 'os.system'; allowed: EDMPrecond, CMPrecond"):
        load_network(tmp_path / "foreign-class.pt")


def _sample_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs" / "sample"), version_base="1.3"):
        return compose(config_name="sample", overrides=overrides)


@pytest.mark.parametrize("name", ["text", "png", "raw_pickle", "torch_zip_code"])
def test_sample_app_refuses_a_network_that_is_not_a_network_file(tmp_path, name):
    marker = tmp_path / "marker"
    path = crafted_files(tmp_path / "files", marker)[name]
    with pytest.raises(NotANetworkFileError, match=f"not a knn-cm network file: {path}"):
        sample.run(_sample_config([f"network={path}", "num_samples=2"]), tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out" / "samples.npz").exists()
