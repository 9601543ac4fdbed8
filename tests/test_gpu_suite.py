"""The GPU suite's dry run: ``experiments/gpu_suite.py --smoke`` runs every section on the
CPU with the tiny model, so the script a GPU session runs once cannot break unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

SUITE = os.path.join(os.path.dirname(__file__), "..", "experiments", "gpu_suite.py")


def test_gpu_suite_smoke_runs_every_section(tmp_path):
    proc = subprocess.run(
        [sys.executable, SUITE, "--smoke", "--minutes=0.6", f"--out={tmp_path}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "suite.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["precision", "acting", "train_step", "blackjack", "babyai"]
    assert not [name for name, r in sections.items() if "error" in r]
    p = sections["precision"]
    # bf16 keeps 8 mantissa bits: on the tiny model its logits stay within a few 1e-3 of
    # fp32 and the argmax agrees almost everywhere; a broken cast would not.
    assert p["positions"] > 0 and p["max_abs_logit_diff"] < 0.1 and p["top1_agreement"] > 0.9
    assert p["max_abs_logit_diff"] > 0  # the two runs really used different dtypes
    for row in sections["acting"]["batches"].values():
        assert row["decode_tokens_per_s"] > 0 and row["hbm_roofline_fraction"] > 0
    for case in ("lora", "full"):
        c = sections["train_step"]["cases"][case]
        assert c["skipped_updates"] == 0 and 0 < c["mfu"] < 1 and c["step_s"] > 0
    # The LoRA runs trained through the launcher and were evaluated at least once.
    for name in ("blackjack", "babyai"):
        r = sections[name]
        assert r["env_steps"] > 0 and r["greedy_curve"]
        assert np.isfinite(r["final_greedy_return"])
        assert (tmp_path / r["workdir"].split(os.sep)[-1] / "summary.json").exists()
