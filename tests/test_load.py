"""lightning_quant.load: artifacts checked against their manifest (sha256, format_version) before loading."""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import BROKEN_MANIFESTS, break_manifest, fast_trainer
from torch.export.pt2_archive.constants import OPAQUE_OBJ_FILENAME_PREFIX

from lightning_quant import DynamicQuantization
from lightning_quant.cli import main as cli
from lightning_quant.demo import DigitsClassifier, DigitsDataModule, MLPNet
from lightning_quant.files import sha256
from lightning_quant.loading import load
from lightning_quant.manifest import FORMAT_VERSION


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("load")
    callback = DynamicQuantization(formats=["onnx", "torch_export"])
    trainer = fast_trainer(tmp_path, [callback])
    # wide enough that ONNX Runtime's int8 file beats float on AVX2 and VNNI CPUs, so it is kept
    trainer.fit(DigitsClassifier(MLPNet(hidden=1024)), datamodule=DigitsDataModule(batch_size=32))
    return callback, tmp_path / "quantized"


def copy_of(exported, tmp_path):
    return shutil.copytree(exported[1], tmp_path / "copy")


def test_load_by_directory_manifest_file_and_format(exported):
    callback, out = exported
    images = torch.rand(5, 1, 8, 8)
    expected = callback.quantized_model.reference(images)  # the int8 model before export
    for model in (load(out), load(out / "manifest.json"), load(out / "model.onnx"), load(out, format="onnx")):
        assert (model(images) - expected).abs().max() < 0.1 * expected.abs().max()  # ORT's own int8 scales
    program = load(out / "manifest.json", format="torch_export")
    assert torch.allclose(program(images), expected, atol=1e-4)


def test_a_changed_file_is_refused(exported, tmp_path):
    out = copy_of(exported, tmp_path)
    with open(out / "model.onnx", "ab") as file:
        file.write(b"\0")
    with pytest.raises(ValueError, match=r"model.onnx does not match .*manifest.json: sha256 .*refusing to load"):
        load(out, format="onnx")
    assert load(out, format="torch_export") is not None  # the untouched file still loads


def test_a_folder_loads_its_recommended_file_else_its_first(exported, tmp_path):
    out = copy_of(exported, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [a["format"] for a in manifest["artifacts"]] == ["onnx", "torch_export"]
    with open(out / "model.onnx", "ab") as file:  # the first file is damaged: loading it is refused
        file.write(b"\0")
    (out / "manifest.json").write_text(json.dumps({**manifest, "recommended": "torch_export"}))
    assert load(out)(torch.rand(3, 1, 8, 8)).shape == (3, 10)  # the recommended file, never the first
    (out / "manifest.json").write_text(json.dumps({**manifest, "recommended": None}))
    with pytest.raises(ValueError, match="model.onnx does not match"):  # none recommended: the first
        load(out)


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (FORMAT_VERSION + 1, "newer than this lightning-quant reads.*upgrade lightning-quant"),
        ("1", "unknown format_version '1'"),
        (None, "unknown format_version None"),
    ],
)
def test_a_manifest_of_an_unknown_or_newer_version_is_refused(exported, tmp_path, version, message):
    out = copy_of(exported, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = version
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=message):
        load(out)


def test_unlisted_missing_and_unknown_files_are_refused(exported, tmp_path):
    out = copy_of(exported, tmp_path)
    (out / "other.onnx").write_bytes((out / "model.onnx").read_bytes())
    with pytest.raises(ValueError, match="other.onnx is not an artifact listed in"):
        load(out / "other.onnx")
    with pytest.raises(ValueError, match=r"has no 'aoti' artifact; it has \['onnx', 'torch_export'\]"):
        load(out, format="aoti")
    (out / "model.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="listed in .* but missing"):
        load(out)
    (out / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="No manifest.json at"):
        load(out / "model_program.pt2")
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(out)


@pytest.mark.parametrize("how", list(BROKEN_MANIFESTS))
def test_a_broken_manifest_is_a_message_naming_it_and_what_is_wrong(exported, tmp_path, how):
    out = copy_of(exported, tmp_path)
    message = break_manifest(out, how)
    with pytest.raises(ValueError, match=message) as refused:
        load(out)
    assert str(out / "manifest.json") in str(refused.value) and "export again" in str(refused.value)


@pytest.mark.parametrize("where", ["absolute", "parent", "symlink"])
def test_a_manifest_path_out_of_the_folder_is_refused(exported, tmp_path, where):
    out = copy_of(exported, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = shutil.copy(out / "model.onnx", elsewhere / "model.onnx")  # the very file, sha256 and all
    manifest = json.loads((out / "manifest.json").read_text())
    onnx = next(a for a in manifest["artifacts"] if a["format"] == "onnx")
    if where == "symlink":
        (out / "model.onnx").unlink()
        (out / "model.onnx").symlink_to(outside)
        message = r"model.onnx is a symlink to .*elsewhere/model.onnx, outside .*copy: refusing it"
    else:
        onnx["path"] = str(outside) if where == "absolute" else "../elsewhere/model.onnx"
        (out / "manifest.json").write_text(json.dumps(manifest))
        message = r"lists the file .*elsewhere/model.onnx', which is not a plain file name inside .*copy: refusing"
    with pytest.raises(ValueError, match=message):
        load(out, format="onnx")
    assert load(out, format="torch_export") is not None  # the files inside still load


def test_a_checkpoint_state_of_a_newer_version_is_refused(exported):
    callback, _ = exported
    state = callback.state_dict()
    assert state["format_version"] == FORMAT_VERSION
    with pytest.raises(ValueError, match="DynamicQuantization state has format_version .*upgrade lightning-quant"):
        callback.load_state_dict({**state, "format_version": FORMAT_VERSION + 1})
    callback.load_state_dict({"manifest": None})  # a checkpoint written before format_version existed: version 1
    assert callback.manifest is not None  # restoring never erases the manifest this process made


class WritesAMarker:
    """Unpickled, it creates ``marker``: what an attacker's file would do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def program_with_a_pickle(program: Path, marker: Path, where: str) -> bytes:
    """The ``torch.export`` archive ``program`` with a pickle that writes ``marker`` where torch.export.load unpickles
    with Python's pickle: a weight marked ``use_pickle``, or an opaque constant."""
    rewritten = program.with_suffix(".crafted")
    with zipfile.ZipFile(program) as source, zipfile.ZipFile(rewritten, "w") as crafted:
        for info in source.infolist():
            data = source.read(info.filename)
            folder = info.filename.rpartition("/")[0]
            if where == "weight" and info.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                weight = next(iter(config["config"].values()))
                weight["use_pickle"], evil = True, f"{folder}/{weight['path_name']}"
                data = json.dumps(config).encode()
            if where == "constant" and info.filename.endswith("model_constants_config.json"):
                config = json.loads(data)
                name = OPAQUE_OBJ_FILENAME_PREFIX + "0"
                config["config"]["evil"] = {
                    "path_name": name,
                    "is_param": False,
                    "use_pickle": True,
                    "tensor_meta": None,
                }
                data = json.dumps(config).encode()
                crafted.writestr(f"{folder}/{name}", pickle.dumps(WritesAMarker(marker)))
            crafted.writestr(info, data)
    if where == "weight":  # the weight's bytes replaced by the pickle
        with zipfile.ZipFile(rewritten) as source:
            entries = [(info, source.read(info.filename)) for info in source.infolist()]
        with zipfile.ZipFile(rewritten, "w") as crafted:
            for info, data in entries:
                crafted.writestr(info, pickle.dumps(WritesAMarker(marker)) if info.filename == evil else data)
    return rewritten.read_bytes()


@pytest.mark.parametrize(
    ("format", "path", "where"),
    [
        ("torchao", "model_torchao.pt", "whole file"),
        ("torch_export", "model_program.pt2", "weight"),
        ("torch_export", "model_program.pt2", "constant"),
        ("aoti", "model_aoti.pt2", "weight"),  # an AOTInductor package is read by the same archive reader
    ],
)
def test_a_file_holding_a_pickle_that_runs_code_is_refused_and_never_run(
    exported, tmp_path, capsys, format, path, where
):
    """The folder is the attacker's, its manifest and sha256 too: load and the CLI unpickle nothing but tensors."""
    out = copy_of(exported, tmp_path)
    marker = tmp_path / "marker"
    if where == "whole file":
        data = pickle.dumps(WritesAMarker(marker))
    else:
        data = program_with_a_pickle(out / "model_program.pt2", marker, where)
    (out / path).write_bytes(data)
    manifest = json.loads((out / "manifest.json").read_text())
    entry = {
        **manifest["artifacts"][0],
        "format": format,
        "path": path,
        "bytes": len(data),
        "sha256": sha256(out / path),
    }
    others = [a for a in manifest["artifacts"] if a["format"] != format]
    (out / "manifest.json").write_text(json.dumps({**manifest, "artifacts": [*others, entry], "recommended": format}))

    refusal = f"Refusing to load {out / path}: it holds (a pickled )?Python object"
    with pytest.raises(ValueError, match=refusal):
        load(out)
    inspect = [["inspect", str(out)]] if format != "aoti" else []  # inspect opens no AOTInductor package (native code)
    for command in [["time", str(out / path)], ["compare", str(out / path), str(out / "model.onnx")], *inspect]:
        assert cli(command) != 0, command
        assert f"Refusing to load {out / path}" in capsys.readouterr().err, command
    assert not marker.exists()
