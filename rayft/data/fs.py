"""Small file helpers that work for local paths and URIs (s3://, gs://, ...) alike."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import pyarrow.fs as pafs


def _resolve(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def is_remote(path: str) -> bool:
    """A URI of a filesystem other than this machine's (s3://, gs://; not file://)."""
    return "://" in path and not path.startswith("file://")


def join(base: str, *parts: str) -> str:
    if "://" in base:
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def read_json(path: str) -> Any | None:
    filesystem, where = _resolve(path)
    if filesystem.get_file_info(where).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(where) as stream:
        return json.loads(stream.read().decode())


def read_text(path: str) -> str:
    """A whole (small) text file, local or remote; FileNotFoundError when absent."""
    filesystem, where = _resolve(path)
    if filesystem.get_file_info(where).type != pafs.FileType.File:
        raise FileNotFoundError(path)
    with filesystem.open_input_stream(where) as stream:
        return stream.read().decode("utf-8")


def write_json(path: str, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2))


def write_text(path: str, text: str) -> None:
    filesystem, where = _resolve(path)
    filesystem.create_dir(where.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(where) as stream:
        stream.write(text.encode("utf-8"))


def list_names(path: str) -> list[str]:
    """Names of the entries directly under a directory, sorted; [] when it is absent."""
    filesystem, where = _resolve(path)
    selector = pafs.FileSelector(where, allow_not_found=True)
    return sorted(info.base_name for info in filesystem.get_file_info(selector))


def exists(path: str) -> bool:
    filesystem, where = _resolve(path)
    return filesystem.get_file_info(where).type != pafs.FileType.NotFound


def remove(path: str) -> None:
    filesystem, where = _resolve(path)
    if filesystem.get_file_info(where).type == pafs.FileType.Directory:
        filesystem.delete_dir(where)


def fingerprint(path: str) -> list[Any]:
    """(path, size, mtime) of a file: enough to notice that an input changed. A hub
    dataset is known by its spec (pin `&revision=` to make reuse exact)."""
    if path.startswith("hf://"):
        return [path]
    filesystem, where = _resolve(path)
    info = filesystem.get_file_info(where)
    mtime = info.mtime_ns if info.mtime_ns is not None else None
    return [path, info.size, mtime]


def tree_size(path: str) -> int:
    """Total bytes of the files under a directory."""
    filesystem, where = _resolve(path)
    selector = pafs.FileSelector(where, recursive=True, allow_not_found=True)
    return sum(info.size or 0 for info in filesystem.get_file_info(selector))


def copy_tree(source: str, target: str) -> str:
    """Copy a directory (local or on a URI filesystem) to `target`; returns `target`."""
    filesystem, where = _resolve(source)
    target_fs, target_where = _resolve(target)
    target_fs.create_dir(target_where, recursive=True)
    pafs.copy_files(where, target_where, source_filesystem=filesystem,
                    destination_filesystem=target_fs)  # fmt: skip
    return target


def move_tree(source: str, target: str) -> str:
    """Move a local directory to `target`: a rename where `target` is on this machine (a
    path or file:// URI), else a copy to its filesystem and the local one removed."""
    if is_remote(target):
        copy_tree(source, target)
        shutil.rmtree(source, ignore_errors=True)
    else:
        local = target.removeprefix("file://")
        os.makedirs(os.path.dirname(local), exist_ok=True)
        shutil.move(source, local)
    return target
