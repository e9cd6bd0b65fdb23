"""Rows of a prepared split -> model features (token ids, labels), as a Ray Data UDF.

Most tasks tokenize on the fly, a row per feature. Windowed tasks (QA over contexts longer
than the window) make any number of features per row: theirs are written once, next to
the prepared rows, and counted, because every worker must know its number of steps."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa

from rayft.config import RayftConfig
from rayft.data import fs
from rayft.tasks import get_task

PROVENANCE = ("_pad", "_source", "_line", "_slice")  # rides along, unused by the model


@functools.lru_cache(maxsize=8)
def _config(cfg_json: str) -> RayftConfig:
    return RayftConfig.model_validate_json(cfg_json)


def tokenize_block(batch: dict[str, np.ndarray], *, cfg_json: str, label2id: dict[str, int]):
    """Ray Data UDF: rows of the prepared split -> model features (ragged, unpadded)."""
    from rayft.modeling import load_tokenizer

    cfg = _config(cfg_json)
    out = get_task(cfg.task).tokenize(batch, load_tokenizer(cfg), cfg, label2id)
    rows = out.pop("_row", None)  # windowed: the row each feature came from
    for name in PROVENANCE:
        if name in batch:
            out[name] = batch[name] if rows is None else batch[name][rows]
    return out


def _as_arrow(batch: dict[str, Any]) -> pa.Table:
    """Features -> an Arrow table with list columns (ragged sequences stay ragged)."""
    columns = {}
    for name, values in batch.items():
        if isinstance(values, np.ndarray) and values.dtype != object:
            columns[name] = pa.array(values)
        else:
            columns[name] = pa.array(
                [v.tolist() if isinstance(v, np.ndarray) else v for v in values]
            )
    return pa.table(columns)


def _windows_block(batch: dict[str, np.ndarray], *, cfg_json: str) -> pa.Table:
    return _as_arrow(tokenize_block(batch, cfg_json=cfg_json, label2id={}))


def write_windows(cfg: RayftConfig, splits: dict[str, str], rows: dict[str, int], root: str):
    """Tokenize each split of a windowed task into `<root>/features/<split>`; return the
    directories and the number of features in each."""
    import pyarrow.dataset as pads
    import ray.data

    task = get_task(cfg.task)
    cfg_json = cfg.model_dump_json()
    dirs, counts = {}, {}
    for split, path in splits.items():
        if not rows.get(split):
            continue
        out = fs.join(root, "features", split)
        ray.data.read_parquet(path, columns=task.row_columns).map_batches(
            functools.partial(_windows_block, cfg_json=cfg_json), batch_format="numpy"
        ).write_parquet(out)
        dirs[split] = out
        counts[split] = pads.dataset(out, format="parquet").count_rows()
    return dirs, counts
