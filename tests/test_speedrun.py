"""The CPU speedrun benchmark (``bench/speedrun_cpu.py``): its scoring and a smoke run."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import speedrun_cpu  # noqa: E402


class Uniform(torch.nn.Module):
    """Equal logits everywhere: every prediction costs ln(V), so the total shows what was counted."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx):
        return (torch.zeros(*idx.shape, self.vocab),)


def test_whole_split_scoring_predicts_every_token_but_the_first_once():
    ids = torch.arange(1000) % 7
    for block in (64, 100, 999):
        got = speedrun_cpu.val_nats_per_char(Uniform(7), ids, block, chars_predicted=999)
        assert math.isclose(got, math.log(7), rel_tol=1e-6)


def test_reference_model_has_nanogpts_shape():
    m = speedrun_cpu.NanoGPTReference(65, 64)
    assert m.wte.weight is m.lm_head.weight  # tied
    # 4 blocks x 12 x 128^2 matmul weights + norms + 65 x 128 tied embedding + 64 x 128 positions
    assert sum(p.numel() for p in m.parameters()) == 4 * 12 * 128 ** 2 + 9 * 128 + 65 * 128 + 64 * 128
    assert m(torch.zeros(2, 64, dtype=torch.long))[0].shape == (2, 64, 65)


def test_quick_run_prints_both_times_and_a_ratio(tmp_path):
    text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 2000)
    data = tmp_path / "text.txt"
    data.write_text(text, encoding="utf-8")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "speedrun_cpu.py"), "--quick", "--data", str(data),
                          "--threads", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "reference seconds to val <= 10.0" in out.stdout and "chatforge seconds to val <= 10.0" in out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith("ratio time: ")
