import json

import pytest
import torch
from tinymodels import task_model as tiny_model
from tinymodels import task_model_dir as tiny_model_dir
from tinymodels import task_tokenizer as tiny_tokenizer

from lmforge.cli import main
from lmforge.core.config import from_dict
from lmforge.core.errors import LmforgeError
from lmforge.core.tensors import IGNORE_INDEX
from lmforge.data.formats import Conversation
from lmforge.model.io import load_model
from lmforge.posttrain.sft import (
    SftBatches,
    SftConfig,
    collate_packed,
    encode_all,
    pack,
    packed_attention_mask,
    run_sft,
    sft_forward,
    sft_loss,
    task_messages,
)
from lmforge.tasks.suite import make_examples
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import encode_conversation


def encoded_tasks(n, seed=0):
    tok = tiny_tokenizer()
    return [encode_conversation(tok, task_messages(e), 128) for e in make_examples(n, seed)]


def test_packed_logits_equal_unpacked_logits():
    model = tiny_model().eval()
    tok = tiny_tokenizer()
    convs = [encode_conversation(tok, [{"role": "user", "content": "reverse: a b c"},
                                       {"role": "assistant", "content": "c b a"},
                                       {"role": "user", "content": "copy: x"},
                                       {"role": "assistant", "content": "x"}], 128), *encoded_tasks(4)]
    batch = collate_packed([convs[:3], convs[3:]], pad_id=tok.pad_id)
    with torch.no_grad():
        packed = sft_forward(model, batch)
        at = {0: 0, 1: 0}
        for row, members in ((0, convs[:3]), (1, convs[3:])):
            for e in members:
                alone = model(torch.tensor([e.input_ids]))[0]
                n = len(e.input_ids)
                torch.testing.assert_close(packed[row, at[row]:at[row] + n], alone, atol=1e-5, rtol=1e-5)
                at[row] += n
        # without the resets the later conversations do see their neighbours
        leaky = model(batch["input_ids"])
        n0 = len(convs[0].input_ids)
        assert not torch.allclose(leaky[0, n0:n0 + 5], packed[0, n0:n0 + 5], atol=1e-3)


def test_packed_mask_and_positions():
    segments = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask = packed_attention_mask(segments)[0, 0]
    assert mask.tolist() == [
        [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1]]
    enc = encoded_tasks(3)
    batch = collate_packed([enc], pad_id=2)
    lengths = [len(e.input_ids) for e in enc]
    assert batch["positions"][0].tolist() == [p for n in lengths for p in range(n)]
    assert batch["segments"][0].tolist() == [s for s, n in enumerate(lengths) for _ in range(n)]
    # the label mask survives packing: the counted targets are the assistant answers only
    tok = tiny_tokenizer()
    counted = [t for t in batch["labels"][0].tolist() if t != IGNORE_INDEX]
    answers = [e.answer for e in make_examples(3, 0)]
    assert tok.decode(counted, skip_special_tokens=False) == "".join(f"{a}<|end|>\n" for a in answers)


def test_pack_respects_max_len_and_keeps_everything():
    enc = encoded_tasks(50)
    rows = pack(enc, 64)
    assert sorted(i for row in rows for i in row) == list(range(50))
    assert all(sum(len(enc[i].input_ids) for i in row) <= 64 for row in rows)
    assert len(rows) < 50  # several per row


def test_batches_resume_exactly():
    enc = encoded_tasks(40)
    a = SftBatches(enc, batch_size=2, max_len=64, packing=True, pad_id=2, seed=3)
    for _ in range(7):  # crosses an epoch boundary
        a.next_batch()
    b = SftBatches(enc, batch_size=2, max_len=64, packing=True, pad_id=2, seed=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(3):
        x, y = a.next_batch(), b.next_batch()
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        assert x["input_ids"].shape == (2, 64)  # packed rows have a fixed width (static shapes)
    plain = SftBatches(enc, batch_size=4, max_len=64, packing=False, pad_id=2).next_batch()
    assert set(plain) == {"input_ids", "labels"} and plain["input_ids"].shape[0] == 4


def test_loss_counts_only_assistant_tokens_and_fused_matches():
    model = tiny_model()
    batch = collate_packed([encoded_tasks(4)], pad_id=2)
    fused, extra = sft_loss(model, batch, fused=True)
    plain, _ = sft_loss(model, batch, fused=False)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    assert extra["loss_tokens"] == int((batch["labels"] != IGNORE_INDEX).sum())


def test_too_long_truncates_or_rejects():
    tok = tiny_tokenizer()
    long = Conversation([{"role": "user", "content": "copy: " + "a " * 40},
                         {"role": "assistant", "content": "a " * 40}], "f.jsonl:3")
    short = Conversation(task_messages(make_examples(1)[0]), "f.jsonl:4")
    kept, truncated, rejected = encode_all(tok, [long, short], 60, "truncate")
    assert len(kept) == 2 and truncated == 1 and not rejected
    kept, truncated, rejected = encode_all(tok, [long, short], 60, "reject")
    assert len(kept) == 1 and truncated == 0 and rejected[0][0] == "f.jsonl:3" and "over max_len 60" in rejected[0][1]
    kept, _, rejected = encode_all(tok, [long], 20, "truncate")  # nothing of the answer fits
    assert not kept and "no assistant token" in rejected[0][1]


def test_run_sft_end_to_end_with_data_file_and_tasks(tmp_path):
    ckpt = tiny_model_dir(tmp_path / "base")
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"copy: {c}", "output": c}) + "\n" for c in "abcdefghij"))
    (tmp_path / "long.jsonl").write_text(json.dumps({"instruction": "x " * 200, "output": "y"}) + "\n")
    cfg = from_dict(SftConfig, {
        "checkpoint": str(ckpt), "data": [str(data), str(tmp_path / "long.jsonl")], "tasks": 60, "eval_tasks": 12,
        "max_len": 96, "too_long": "reject", "batch_size": 4, "run_dir": str(tmp_path / "run"),
        "train": {"steps": 6, "eval_every": 3, "save_every": 0, "log_every": 2, "device": "cpu",
                  "precision": "fp32"}})
    out = run_sft(cfg)
    assert out["steps"] == 6 and out["rejected"] == 1 and out["train_conversations"] == 69
    for key in ("exact_match", "base_exact_match", "val_loss", "base_val_loss"):
        assert out[key] is not None
    assert out["val_loss"] < out["base_val_loss"]
    model_dir = tmp_path / "run" / "model"
    assert Tokenizer.load(model_dir).sha256 == tiny_tokenizer().sha256
    load_model(model_dir)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("exact_match" in r for r in rows) and any("loss_tokens" in r for r in rows)
    assert "long.jsonl:1" in (tmp_path / "run" / "rejected.jsonl").read_text()


@pytest.mark.parametrize("method, packing", [("lora", "false"), ("prompt", "true")])
def test_cli_sft_with_peft_writes_an_adapter(tmp_path, method, packing):
    ckpt = tiny_model_dir(tmp_path / "base")
    # prompt tuning adds 20 virtual positions: the default max_len leaves room for them
    code = main(["sft", "--checkpoint", str(ckpt), "--tasks", "30", "--eval_tasks", "4", "--run_dir",
                 str(tmp_path / "run"), "--train.steps", "2", "--train.device", "cpu", "--peft.method", method,
                 "--packing", packing, "--max_new_tokens", "4"])
    assert code == 0
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "adapter" / "tokenizer.json").is_file()


def test_bad_inputs(tmp_path):
    with pytest.raises(LmforgeError, match="checkpoint"):
        run_sft(SftConfig(tasks=10, run_dir=str(tmp_path / "r")))
    ckpt = tiny_model_dir(tmp_path / "base")
    with pytest.raises(LmforgeError, match="no training conversations"):
        run_sft(SftConfig(checkpoint=str(ckpt), eval_tasks=0, run_dir=str(tmp_path / "r")))
    with pytest.raises(LmforgeError, match="max_len 4096 exceeds"):
        run_sft(SftConfig(checkpoint=str(ckpt), tasks=5, max_len=4096, run_dir=str(tmp_path / "r")))
    with pytest.raises(LmforgeError, match="task_kinds"):
        SftConfig(task_kinds=["poetry"])


def test_resume_repeats_the_uninterrupted_run(tmp_path, capsys):
    import shutil

    from lmforge.model.io import load_weights

    ckpt = tiny_model_dir(tmp_path / "base")

    def cfg(run):
        return from_dict(SftConfig, {
            "checkpoint": str(ckpt), "tasks": 40, "eval_tasks": 0, "max_len": 64, "batch_size": 2,
            "run_dir": str(tmp_path / run), "resume": True,
            "train": {"steps": 4, "save_every": 2, "keep_checkpoints": 0, "device": "cpu", "precision": "fp32"}})

    run_sft(cfg("a"))
    run_sft(cfg("b"))
    ckpts = tmp_path / "b" / "checkpoints"
    shutil.rmtree(ckpts / "step_000004")  # as if killed after the step-2 checkpoint
    (ckpts / "latest").write_text("step_000002")
    capsys.readouterr()
    run_sft(cfg("b"))
    assert "from step 2" in capsys.readouterr().err
    a, b = load_weights(tmp_path / "a" / "model" / "model.safetensors"), load_weights(
        tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
