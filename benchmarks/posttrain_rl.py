"""Measured effect of the preference/RL stages on the synthetic task suite, from a small SFT'd model.

Pipeline (one process, CPU): tiny BPE tokenizer -> random 2-layer model -> `run_sft` on task conversations
-> `run_reward` (held-out pair accuracy), `run_dpo` (held-out chosen-vs-rejected margin and accuracy) and
`run_grpo` (held-out greedy exact match), each starting from the SFT model. The "peer" column is the same
figure before the stage (the SFT model, or chance for the reward model).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/posttrain_rl.py [--out /tmp/posttrain_rl]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from common import machine_line, report
from tinymodels import save_checkpoint, text_tokenizer  # tests/, on the import path through common

from lmforge.core.config import from_dict
from lmforge.model import ModelConfig, Transformer
from lmforge.posttrain.dpo import DpoConfig, run_dpo
from lmforge.posttrain.grpo import GrpoConfig, run_grpo
from lmforge.posttrain.reward import RewardConfig, run_reward
from lmforge.posttrain.sft import SftConfig, run_sft

COMMAND = "OMP_NUM_THREADS=2 python benchmarks/posttrain_rl.py"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/posttrain_rl")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    tok = text_tokenizer()  # 320-token BPE on real text
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=64, n_layers=2, n_heads=4, max_seq_len=128, vocab_size=tok.vocab_size))
    base = save_checkpoint(model.eval(), tok, out / "base")
    cpu = {"device": "cpu", "save_every": 0, "eval_every": 0}
    sft = run_sft(from_dict(SftConfig, {"checkpoint": str(base), "run_dir": str(out / "sft"), "tasks": 4000,
                                        "train": {"steps": 400, "lr": 2e-3, **cpu}}))
    model = sft["model_dir"]
    t_sft = time.time() - t0
    rm = run_reward(from_dict(RewardConfig, {"checkpoint": model, "run_dir": str(out / "reward"),
                                             "synthetic_pairs": 1200, "train": {"steps": 150, "lr": 3e-4, **cpu}}))
    dpo = run_dpo(from_dict(DpoConfig, {"checkpoint": model, "run_dir": str(out / "dpo"), "synthetic_pairs": 600,
                                        "peft": {"method": "lora"}, "train": {"steps": 60, "lr": 2e-3, **cpu}}))
    grpo = run_grpo(from_dict(GrpoConfig, {
        "checkpoint": model, "run_dir": str(out / "grpo"), "group_size": 8, "kl_coef": 0.0,
        "rollout": {"prompts_per_rollout": 16}, "sampling": {"max_new_tokens": 12, "temperature": 0.8},
        "train": {"steps": 80, "lr": 5e-5, **cpu}}))
    wall = time.time() - t0
    rows = [
        ("SFT held-out exact match (base = random init)", sft["exact_match"], sft["base_exact_match"]),
        ("reward model held-out pair accuracy (peer = chance)", rm["heldout_accuracy"], 0.5),
        ("DPO+LoRA held-out log-prob margin chosen-rejected (peer = SFT)", dpo["heldout_logp_margin"],
         dpo["heldout_logp_margin_before"]),
        ("DPO+LoRA held-out preference accuracy (peer = SFT)", dpo["heldout_preference_accuracy"],
         dpo["heldout_preference_accuracy_before"]),
        ("GRPO held-out exact match (peer = SFT)", grpo["heldout_exact_match"], grpo["heldout_exact_match_before"]),
    ]
    report([(name, f"{ours:.3f}", f"{peer:.3f}", f"{ours / peer:.2f}" if peer else "-") for name, ours, peer in rows],
           machine_line(), COMMAND, "quality figures: exact match and accuracy 1.0 (no speed limit applies)")
    print(f"\nwall time {wall:.0f} s (SFT {t_sft:.0f} s)")


if __name__ == "__main__":
    main()
