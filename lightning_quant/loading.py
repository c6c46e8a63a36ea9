"""``load``: open an exported artifact safely, checked against its ``manifest.json``.

Example (after a fit, ``load("lightning_logs/quantized")``; here files written by ``deploy``)::

    >>> import tempfile, torch
    >>> import lightning_quant
    >>> from lightning_quant.quantization import WeightOnlyConfig
    >>> out = tempfile.mkdtemp()
    >>> deployment = lightning_quant.deploy(
    ...     torch.nn.Linear(32, 4), WeightOnlyConfig(bits=4), torch.randn(2, 32), dirpath=out, formats=["torch_export"]
    ... )
    >>> model = lightning_quant.load(out)  # the recommended file of the manifest in that folder
    >>> model(torch.randn(3, 32)).shape
    torch.Size([3, 4])
    >>> model = lightning_quant.load(f"{out}/model_program.pt2")  # one file, checked against the manifest beside it
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from lightning_quant.export import load_artifact
from lightning_quant.files import sha256
from lightning_quant.manifest import FILENAME, check_format_version, read_manifest
from lightning_quant.target import cpu_info, flags_known


def load(path_or_manifest: Union[str, Path], format: Optional[str] = None) -> Any:
    """Load an exported artifact as a callable taking the model's inputs, after checking it.

    Args:
        path_or_manifest: the export directory, its ``manifest.json``, or one artifact file in it.
        format: which artifact of the manifest to load (e.g. ``"onnx"``). Default: the artifact file given,
            else the manifest's ``recommended`` one (the fastest verified file), else its first (when no file is
            faster than float).

    The file's sha256 must match the manifest's, the manifest's ``format_version`` must be one this
    lightning-quant reads, this CPU must have the instructions of the target the file was made for (e.g. a
    ``target="avx512_vnni"`` file is refused on an AVX2-only CPU instead of crashing or computing wrong
    numbers), the manifest's path for the file must be a plain name in its folder, and nothing is unpickled but
    tensors (``torchao`` files and ``torch.export`` programs are read weights-only, ONNX files are protobuf): a shared
    folder brings its own manifest, so its sha256 alone proves nothing. An AOTInductor package (native code) or a
    TorchScript program is code however it is read: load those only from a source you trust.

    Raises:
        FileNotFoundError: no manifest or no file where one is expected.
        ValueError: a sha256 mismatch, an unknown or newer ``format_version``, a format the manifest does not
            list, a manifest of a run that produced no artifact, or a manifest path that is not a plain file name
            inside the folder (:func:`artifact_file`).
        RuntimeError: this CPU lacks an instruction set the file's target requires.
    """
    path = Path(path_or_manifest)
    if path.is_dir():
        manifest_path, requested = path / FILENAME, None
    elif path.name == FILENAME:
        manifest_path, requested = path, None
    else:
        manifest_path, requested = path.parent / FILENAME, path.name
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"No {FILENAME} at {manifest_path}: lightning_quant.load checks every file against the manifest its "
            "export wrote. Pass the export directory (with its manifest.json) or a file inside it."
        )
    manifest = read_manifest(manifest_path)
    check_format_version(manifest.get("format_version") if isinstance(manifest, dict) else None, str(manifest_path))
    artifacts = manifest.get("artifacts", [])
    if not artifacts:
        raise ValueError(
            f"{manifest_path} lists no artifact (status {manifest.get('status')!r}): "
            f"{manifest.get('error') or manifest.get('failures') or 'nothing was exported'}"
        )
    entry = _pick(manifest, requested, format, manifest_path)
    for part, recorded in entry_files(manifest_path, entry):
        if not part.is_file():
            raise FileNotFoundError(
                f"{part} is listed in {manifest_path} but missing: copy the whole export directory."
            )
        digest = sha256(part)
        if digest != recorded:
            raise ValueError(
                f"{part} does not match {manifest_path}: sha256 {digest} != {recorded}. The file changed after "
                "export (or was damaged or replaced); refusing to load it. Export again, or copy the directory intact."
            )
    file = artifact_file(manifest_path, entry["path"])
    check_cpu_runs(manifest, file)
    return load_artifact(file, entry["format"])


def entry_files(manifest_path: Path, entry: dict[str, Any]) -> list[tuple[Path, Any]]:
    """The files of one manifest entry with the sha256 the manifest recorded for each: the file, then the weights
    file beside it for formats that have one (OpenVINO's ``.bin``)."""
    files = [(artifact_file(manifest_path, entry.get("path")), entry.get("sha256"))]
    details = entry.get("details") or {}
    if "weights_file" in details:
        files.append((artifact_file(manifest_path, details["weights_file"]), details.get("weights_sha256")))
    return files


def artifact_file(manifest_path: Path, name: Any) -> Path:
    """The file a manifest entry's ``path`` names, which must be a plain file name inside the manifest's folder.

    A manifest arrives with its folder, from whoever shared it: an absolute path, a ``..`` or a symlink out of the
    folder would make ``load`` (or the CLI) open, hash and run a file the folder does not hold.

    Raises:
        ValueError: ``name`` is not a plain file name, or names a symlink to a file outside the folder.
    """
    folder = manifest_path.parent
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        raise ValueError(
            f"{manifest_path} lists the file {name!r}, which is not a plain file name inside {folder}: refusing it "
            "(an absolute path or '..' would open a file outside the folder). lightning-quant writes plain names; "
            "export again, or fix the manifest to name the file beside it."
        )
    file = folder / name
    if file.resolve().parent != folder.resolve():
        raise ValueError(
            f"{file} is a symlink to {file.resolve()}, outside {folder}: refusing it (the manifest's files must be "
            "in its folder). Copy the file itself into the folder."
        )
    return file


def check_cpu_runs(manifest: dict[str, Any], file: Path) -> None:
    """Refuse a file whose target (recorded in the manifest) needs CPU flags this machine lacks."""
    target = manifest.get("target")
    if not target:  # written before targets existed: built for the exporting machine
        return
    cpu = cpu_info()
    missing = [flag for flag in target["requires"] if flag not in cpu["flags"]] if flags_known(cpu) else []
    if missing:
        raise RuntimeError(
            f"{file} was built for target {target['name']!r} (CPU flags {target['requires']}) "
            f"on {manifest.get('cpu', {}).get('model', 'another CPU')}; this CPU ({cpu_info()['model']}) lacks "
            f"{missing}, so it would crash or compute wrong int8 results here. Export again with target='avx2' "
            "(any x86-64 CPU with AVX2), or run it on a CPU with those instructions."
        )


def _pick(
    manifest: dict[str, Any], filename: Optional[str], format: Optional[str], manifest_path: Path
) -> dict[str, Any]:
    artifacts = manifest["artifacts"]
    listed = {a["format"]: a for a in artifacts}
    if filename is not None:
        matches = [a for a in artifacts if a["path"] == filename and (format is None or a["format"] == format)]
        if not matches:
            raise ValueError(
                f"{filename} is not an artifact listed in {manifest_path} (it lists "
                f"{[a['path'] for a in artifacts]}); refusing to load an unlisted file."
            )
        return matches[0]
    if format is None:
        return listed.get(manifest.get("recommended"), artifacts[0])
    if format not in listed:
        failures = manifest.get("failures", {})
        why = f" It failed: {failures[format]}" if format in failures else ""
        raise ValueError(f"{manifest_path} has no {format!r} artifact; it has {list(listed)}.{why}")
    return listed[format]
