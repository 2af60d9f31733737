"""The published weights of every variant (the table is data: ``weights.json`` beside this module) and the file of
one of them on this machine: found in the drop-in folder, in a cache, or downloaded and checked (``hub``).

Each model has a default tag (timm's hub repo, one key layout per family, converted by the existing loaders) and
other tags: the official release files (a direct download for EfficientViT, Google Drive pages for the others,
``kind: manual``) and, for SwiftFormer, Hugging Face transformers' files (the legacy attention revision).

A file placed by hand in ``$EDGEVITS_CACHE/weights/`` (``drop_in_dir()``) under a source's ``file_name`` is used
before anything is downloaded: that is the way in for a machine without network and for the manual downloads.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from .hub import DownloadError, Progress, check_sha256, hf_download, hub_url, url_download
from .io import cache_dir
from .preprocess import DataConfig, unknown_name

TABLE_FILE = Path(__file__).with_name("weights.json")
CLASSES_FILE = Path(__file__).with_name("imagenet_classes.txt")
KINDS = ("hub", "url", "manual")


@dataclass(frozen=True)
class WeightsSource:
    """One published set of weights of ``model``: where it is (``kind`` hub: ``repo_id``/``filename`` at
    ``revision``; url: a direct download; manual: a page, ``url``, to fetch ``file_name`` from by hand), the name
    it is looked for under in the drop-in folder (``file_name``), its sha256 when one is pinned, its published
    top-1, the SwiftFormer attention revision it needs and the preprocessing it was evaluated with."""

    model: str
    tag: str
    source: str
    kind: str
    file_name: str
    preprocess: DataConfig
    repo_id: str | None = None
    revision: str = "main"
    filename: str | None = None
    url: str | None = None
    sha256: str | None = None
    top1: float | None = None
    top1_source: str = ""
    attention_revision: str | None = None
    note: str = ""
    default: bool = field(default=False, compare=False)

    @property
    def location(self) -> str:
        """The URL the weights come from (the hub URL on ``HF_ENDPOINT`` for hub files)."""
        return hub_url(self.repo_id, self.filename, self.revision) if self.kind == "hub" else self.url

    @property
    def label(self) -> str:
        """``repo_id`` for hub files, else the file name (for tables)."""
        return self.repo_id if self.kind == "hub" else self.file_name


@functools.cache
def _read_table(path: str = str(TABLE_FILE)) -> dict[str, list[WeightsSource]]:
    """The table file parsed and checked (every tag unique per model, a known kind, 64-hex hashes)."""
    doc = json.loads(Path(path).read_text())
    presets = {k: DataConfig(**v) for k, v in doc["preprocess"].items()}
    table = {}
    for model, entry in doc["models"].items():
        sources = []
        for i, item in enumerate(entry["weights"]):
            item = dict(item)
            item["preprocess"] = presets[item["preprocess"]]
            src = WeightsSource(model=model, default=i == 0, **item)
            if src.kind not in KINDS or (src.sha256 and len(src.sha256) != 64):
                raise ValueError(f"{path}: bad entry {model}.{src.tag}")
            sources.append(src)
        if len({s.tag for s in sources}) != len(sources):
            raise ValueError(f"{path}: {model} has a tag twice")
        table[model] = sources
    return table


def weights_table() -> dict[str, list[WeightsSource]]:
    """Every model's published weights, the default first: ``{model name: [WeightsSource, ...]}``."""
    return _read_table()


def list_weights(name: str | None = None) -> list[WeightsSource]:
    """The published weights of ``name`` (default first), or of every model."""
    table = weights_table()
    if name is None:
        return [s for sources in table.values() for s in sources]
    if name not in table:
        raise unknown_name(name, table)
    return list(table[name])


def get_weights(name: str, tag: str | bool | None = None) -> WeightsSource:
    """The weights of ``name`` tagged ``tag`` (``None``, ``True`` or ``"default"``: the default, timm's hub repo).
    An unknown model is an ``UnknownModelError``; an unknown tag a ``ConfigError`` listing the tags."""
    sources = list_weights(name)
    if tag in (None, True, "default"):
        return sources[0]
    for src in sources:
        if src.tag == tag:
            return src
    tags = "; ".join(f"{s.tag} ({s.source}, {s.kind}{', default' if s.default else ''})" for s in sources)
    raise ConfigError(f"{name} has no weights tagged {tag!r}; its tags: {tags}")


def drop_in_dir() -> Path:
    """``$EDGEVITS_CACHE/weights``: where plain-URL downloads are kept and where a file placed by hand (under its
    source's ``file_name``) is found."""
    return cache_dir("weights")


def pretrained_file(source: WeightsSource, progress: Progress | None = None) -> Path:
    """The file of ``source`` on this machine: the drop-in folder's copy, else a download (hub files through
    huggingface_hub's cache, plain URLs into the drop-in folder), checked against every sha256 known for it.

    Raises ``CheckpointError``: for a manual source not placed yet (naming the page, the file name and the folder
    to put it in), or a download that failed (one line: the URL, the file name expected and the drop-in folder,
    where a file placed by hand is found by the next call)."""
    placed = drop_in_dir() / source.file_name
    if placed.is_file():
        check_sha256(placed, {"the pinned sha256": source.sha256}, str(placed))
        return placed
    where = f"{source.model} weights {source.tag!r}"
    if source.kind == "manual":
        raise CheckpointError(
            f"{where} ({source.source}) are not a direct download: get {source.file_name} from {source.url} "
            f"({source.note or 'see its README'}), then put it in {drop_in_dir()}/ (found there by the next call) "
            f"or pass it as checkpoint=PATH / --checkpoint PATH")
    try:
        if source.kind == "hub":
            return hf_download(source.repo_id, source.filename, source.revision, source.sha256)
        return url_download(source.url, placed, source.sha256, progress)
    except DownloadError as e:
        raise DownloadError(f"{e}; to use the {where} without a download, fetch that URL by hand and save it as "
                            f"{drop_in_dir() / source.file_name} (found there by the next call)") from None


@functools.cache
def _imagenet() -> tuple[tuple[str, str], ...]:
    rows = [line.split("\t") for line in CLASSES_FILE.read_text().splitlines() if line.strip()]
    return tuple((synset, name) for _, synset, name in rows)


def imagenet_classes(synsets: bool = False) -> list[str]:
    """The 1000 ImageNet-1k classes in class-index order: short readable names (``"tench"``), or their WordNet
    synset ids (``"n01440764"``, the folder names of ImageNet's ImageFolder layout) with ``synsets``."""
    return [s if synsets else n for s, n in _imagenet()]
