"""Where rows come from: a .parquet/.jsonl file, a folder written by `datasets`'
`Dataset.save_to_disk` (or `DatasetDict.save_to_disk`, then `folder@split`), or
`hf:NAME[:CONFIG][@SPLIT]` resolved by `datasets.load_dataset` (split default train).

`hf:` sources are read from the local Hugging Face cache when `HF_DATASETS_OFFLINE=1` (hapo
never sets it for you: with network access `datasets` may download). `datasets` is the
`datasets` extra (pip install 'hapo[datasets]'), imported only for these two kinds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import HapoError

SUPPORTED_SUFFIXES = (".parquet", ".jsonl")
HF_PREFIX = "hf:"


class SourceError(HapoError):
    """A data source that does not exist or cannot be read: one line naming it."""


def split_source(source: str | Path) -> tuple[str, str | None]:
    """(location, split): 'folder@test' -> ('folder', 'test'); a file path has no split."""
    text = str(source)
    loc, sep, split = text.rpartition("@")
    if sep and split and "/" not in split and (text.startswith(HF_PREFIX) or Path(loc).is_dir()):
        return loc, split
    return text, None


def is_dataset_source(source: str | Path) -> bool:
    """An hf: name or a save_to_disk folder (with or without @split), not a data file."""
    loc, _ = split_source(source)
    return loc.startswith(HF_PREFIX) or Path(loc).is_dir()


def source_name(source: str | Path) -> str:
    """Short name of a source (benchmark name, uid prefix): a file's stem, a folder's name, an
    hf dataset's last path part (and its config, e.g. 'gsm8k-main')."""
    loc, _ = split_source(source)
    if loc.startswith(HF_PREFIX):
        name, _, config = loc[len(HF_PREFIX):].partition(":")
        return name.rstrip("/").rsplit("/", 1)[-1] + (f"-{config}" if config else "")
    return Path(loc).stem if Path(loc).suffix in SUPPORTED_SUFFIXES else Path(loc).name


def check_source(source: str, field: str) -> None:
    """SourceError unless `source` names something loadable (checked at start, before any model
    is loaded): an existing file of a known type, a folder, or a well-formed hf: name."""
    loc, _ = split_source(source)
    if loc.startswith(HF_PREFIX):
        name = loc[len(HF_PREFIX):].partition(":")[0]
        if not name.strip():
            raise SourceError(f"{field}: {source!r}: expected hf:NAME[:CONFIG][@SPLIT]")
        _datasets(field, source)
        return
    path = Path(loc)
    if path.is_dir():
        _datasets(field, source)
        return
    if not path.is_file():
        raise SourceError(f"{field}: {source}: no such file or folder (expected parquet, jsonl, "
                          "a save_to_disk folder or hf:NAME[:CONFIG][@SPLIT])")


def _datasets(field: str, source: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise SourceError(f"{field}: {source}: reading it needs the datasets package "
                          "(pip install 'hapo[datasets]')") from None
    return datasets


def read_dataset_rows(source: str | Path) -> list[tuple[str, dict]]:
    """[(where, record)] of a save_to_disk folder or an hf: dataset, `where` like "row 3"."""
    loc, split = split_source(source)
    datasets = _datasets("data", str(source))
    try:
        if loc.startswith(HF_PREFIX):
            name, _, config = loc[len(HF_PREFIX):].partition(":")
            ds = datasets.load_dataset(name, config or None, split=split or "train")
        else:
            ds = datasets.load_from_disk(loc)
            if isinstance(ds, datasets.DatasetDict):
                splits = list(ds)
                if split is None and len(splits) == 1:
                    split = splits[0]
                if split not in ds:
                    raise SourceError(f"{source}: holds the splits {', '.join(splits)}; name "
                                      f"one as {loc}@{splits[0]}")
                ds = ds[split]
            elif split is not None:
                raise SourceError(f"{source}: {loc} holds one dataset, not splits; drop '@{split}'")
    except HapoError:
        raise
    except Exception as err:  # datasets raises many types: missing cache, bad folder, offline
        text = str(err).strip().splitlines()
        raise SourceError(f"{source}: cannot be loaded by datasets ({type(err).__name__}: "
                          f"{text[0][:160] if text else ''})") from None
    return [(f"row {i}", dict(r)) for i, r in enumerate(ds.to_list(), start=1)]
