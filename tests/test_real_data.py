"""Real pretrained model, real data: MiniLM + LoRA on SST-2 must reach 0.85 dev accuracy."""

from __future__ import annotations

import pytest

from rayft.config import load_config
from rayft.trainer import fit
from tests.conftest import REPO, SHARED_DATA

SST2 = SHARED_DATA / "sst2"


@pytest.mark.real
@pytest.mark.skipif(not SST2.is_dir(), reason="../shared/data/sst2 is not present")
def test_minilm_lora_on_sst2_reaches_085(tmp_path, ray_session):
    lines = (SST2 / "train.tsv").read_text().splitlines()
    sentences = [row for row in lines[1:] if len(row.split("\t")[0].split()) >= 10][:10000]
    subset = tmp_path / "train-10000.tsv"
    subset.write_text("\n".join([lines[0], *sentences]) + "\n")
    cfg = load_config(
        REPO / "configs/sst2_lora.yaml",
        [f"data.train={subset}", f"data.eval={SST2 / 'dev.tsv'}", f"output_dir={tmp_path / 'out'}"],
    )
    metrics = fit(cfg)
    assert metrics["eval_rows"] == 872
    assert metrics["accuracy"] >= 0.85, metrics
    assert metrics["accuracy"] > metrics["baselines"]["majority"]["accuracy"] + 0.3
