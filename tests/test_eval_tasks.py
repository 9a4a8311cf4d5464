import json

import pytest
import torch
from textdata import SHAKESPEARE
from tinymodels import debug_model

from lmforge.cli import main
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.eval.decontam import ExampleText, find_contamination, ngram_hashes
from lmforge.eval.harness import encode_pair, evaluate_task, loglikelihoods, prefix_ids, run_tasks
from lmforge.eval.make_tasks import make_cloze_rows, make_cloze_task, make_synthetic_task, write_task
from lmforge.eval.pairwise import reward_accuracy, tally, win_rate
from lmforge.eval.tasks import cut_at_stop, load_task, multiple_choice_metrics, token_f1
from lmforge.generate.engine import generate
from lmforge.generate.sampling import SamplingParams
from lmforge.model import Transformer, save_model
from lmforge.tokenizer.chat import prompt_ids, stop_token_ids
from lmforge.tokenizer.train import train_bpe

TEXT = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], vocab_size=400, show_progress=False)


@pytest.fixture(scope="module")
def model(tokenizer):
    return debug_model(tokenizer.vocab_size, 0, max_seq_len=64)


def test_multiple_choice_metrics_hand_computed():
    # raw: -10 > -12 picks choice 0; per character: -10/1 = -10 < -12/13 = -0.92 picks choice 1
    assert multiple_choice_metrics([-10.0, -12.0], ["a", "longer choice"], gold=1) == {"acc": 0.0, "acc_norm": 1.0}
    assert multiple_choice_metrics([-3.0, -2.0, -9.0], ["xx", "yy", "zz"], gold=1) == {"acc": 1.0, "acc_norm": 1.0}


def test_token_f1_and_stop():
    # "the" is dropped; pred {cat, sat}, gold {cat, sat, down}: P = 1, R = 2/3, F1 = 0.8
    assert token_f1("The cat sat.", "cat sat down") == pytest.approx(0.8)
    assert token_f1("dog", "cat") == 0.0
    assert cut_at_stop("12\n\nmore\n", ["\n\n", "more"]) == "12"


def test_loglikelihoods_match_unbatched_forward(model):
    g = torch.Generator().manual_seed(1)
    requests = [(torch.randint(0, 300, (n,), generator=g).tolist(), torch.randint(0, 300, (m,), generator=g).tolist())
                for n, m in [(5, 3), (20, 1), (9, 7), (2, 2), (70, 4)]]  # the last one is cut from the left
    got = loglikelihoods(model, requests, batch_size=2)
    for (ctx, cont), (ll, greedy) in zip(requests, got):
        full = (ctx + cont)[-65:]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full[:-1]])).float(), -1)[0]
        span = logp[len(full) - 1 - len(cont):]
        want = sum(span[j, t].item() for j, t in enumerate(cont))
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == all(span[j].argmax().item() == t for j, t in enumerate(cont))


def test_encode_pair_moves_trailing_space(tokenizer):
    ctx, cont = encode_pair(tokenizer, "To be or not to ", "be")
    assert tokenizer.decode(ctx) == "To be or not to"
    assert tokenizer.decode(cont) == " be"


def test_generate_task_matches_engine_greedy(tmp_path, tokenizer, model):
    rows = [{"q": f"Question {i}: who is", "a": "king"} for i in range(5)]
    path = write_task(tmp_path, {"name": "gen", "type": "generate", "prompt": "{q}", "answer": "a",
                                 "chat": True, "stop": ["\n"], "max_new_tokens": 6}, rows)
    result = evaluate_task(model, tokenizer, load_task(path), batch_size=2)
    assert result["n"] == 5 and set(result) >= {"exact_match", "f1", "exact_match_stderr"}
    for row, rec in zip(rows, result["examples"]):
        messages = [{"role": "user", "content": row["q"]}]
        ids = generate(model, prompt_ids(tokenizer, messages),
                       SamplingParams(greedy=True, max_new_tokens=6, stop_token_ids=stop_token_ids(tokenizer)))
        assert rec["output"] == tokenizer.decode(ids)
        assert rec["exact_match"] == float(rec["prediction"] == "king")


def test_multiple_choice_task_scores_choices(tmp_path, tokenizer, model):
    rows = [{"context": "The king is", "choices": ["dead", "alive", "here"], "answer": "alive"},
            {"context": "My lord", "choices": ["yes", "no"], "answer": 0}]
    path = write_task(tmp_path, {"name": "mc", "type": "multiple_choice", "prompt": "{context}"}, rows)
    result = evaluate_task(model, tokenizer, load_task(path))
    rec = result["examples"][0]
    assert rec["gold"] == 1 and len(rec["logliks"]) == 3
    ctx, cont = encode_pair(tokenizer, "The king is", " alive")
    (ll, _), = loglikelihoods(model, [(prefix_ids(tokenizer) + ctx, cont)])
    assert rec["logliks"][1] == pytest.approx(ll, abs=1e-3)
    assert rec["acc"] == float(max(range(3), key=lambda i: rec["logliks"][i]) == 1)
    assert result["acc"] == pytest.approx(sum(r["acc"] for r in result["examples"]) / 2)


def test_fewshot_prompts_use_other_examples(tmp_path):
    rows = [{"q": f"q{i}", "a": f"a{i}"} for i in range(6)]
    path = write_task(tmp_path, {"name": "fs", "type": "generate", "prompt": "Q: {q}\nA:", "answer": "a",
                                 "fewshot": 2}, rows)
    task = load_task(path)
    for ex in task.examples:
        parts = ex.prompt.split("\n\n")
        assert len(parts) == 3 and parts[-1] == f"Q: q{ex.index}\nA:"
        assert all(f"q{ex.index}\n" not in p and p.endswith(f"A: a{p.split()[1][1:]}") for p in parts[:2])


def test_task_file_errors_name_the_place(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"x": 1}\n{"x": 2, "answer": "y"}\n')
    (tmp_path / "t.yaml").write_text("name: t\ntype: generate\ndata: d.jsonl\npromt: '{x}'\n")
    with pytest.raises(ConfigError, match=r"t.yaml: unknown config key 'promt' \(did you mean 'prompt'"):
        load_task(tmp_path / "t.yaml")
    (tmp_path / "t.yaml").write_text("name: t\ntype: generate\ndata: d.jsonl\nprompt: '{y}'\n")
    with pytest.raises(LmforgeError, match=r"d.jsonl:1: prompt uses field 'y'"):
        load_task(tmp_path / "t.yaml")
    (tmp_path / "t.yaml").write_text("name: t\ntype: generate\ndata: d.jsonl\nprompt: '{x}'\n")
    with pytest.raises(LmforgeError, match=r"d.jsonl:1: no 'answer' field"):
        load_task(tmp_path / "t.yaml")
    (tmp_path / "d.jsonl").write_text('{"c": ["a", "b"], "answer": "z", "prompt": "p"}\n')
    (tmp_path / "t.yaml").write_text("name: t\ntype: multiple_choice\ndata: d.jsonl\n")
    with pytest.raises(LmforgeError, match=r"d.jsonl:1: field 'choices' must be a list"):
        load_task(tmp_path / "t.yaml")
    (tmp_path / "t.yaml").write_text("name: t\ntype: multiple_choice\ndata: d.jsonl\nchoices: c\n")
    with pytest.raises(LmforgeError, match=r"answer 'z' is not one of the choices"):
        load_task(tmp_path / "t.yaml")


def test_cloze_rows_come_from_the_text():
    rows = make_cloze_rows([TEXT], n=50, n_choices=4, seed=3)
    assert len(rows) == 50
    flat = " ".join(TEXT.split())
    for r in rows:
        assert len(set(r["choices"])) == 4
        word = r["choices"][r["answer"]]
        assert f"{r['context']} {word}" in flat  # the context is followed by its right last word


def test_synthetic_task_is_held_out(tmp_path):
    from lmforge.tasks.suite import make_examples

    task = load_task(make_synthetic_task(tmp_path, n=30))
    train_prompts = {e.prompt for e in make_examples(600, seed=0)}
    assert len(task.examples) == 30 and task.spec.chat
    assert not {ex.prompt for ex in task.examples} & train_prompts


def test_ngram_hashes_equal_windows_hash_equal():
    import numpy as np

    ids = np.array([1, 2, 3, 1, 2, 3, 4], dtype=np.uint64)
    h = ngram_hashes(ids, 3)
    assert len(h) == 5 and h[0] == h[3] and len(set(h.tolist())) == 4
    assert len(ngram_hashes(ids, 8)) == 0


def test_decontamination_flags_copied_examples():
    train = [TEXT[:50_000]]
    copied = " ".join(TEXT[1000:3000].split()[:30])
    short_copy = " ".join(TEXT[1000:3000].split()[40:49])  # 9 words: checked whole as one 9-gram
    fresh = "completely novel words that never appear in any play of the bard whatsoever at all today"
    examples = [ExampleText("t", 0, copied), ExampleText("t", 1, fresh), ExampleText("t", 2, "too short"),
                ExampleText("t", 3, short_copy), ExampleText("t", 4, "the king is dead long live the queen")]
    report = find_contamination(examples, train, n=13, min_n=8, chunk_words=500)  # n-grams span small chunks
    t = report["tasks"]["t"]
    assert (t["examples"], t["contaminated"], t["too_short"]) == (5, 2, 1)
    assert [(f["index"], f["overlap"]) for f in t["flagged"]] == [(0, 1.0), (3, 1.0)]
    assert t["contaminated_fraction"] == 0.5


def test_eval_cli_runs_tasks_and_perplexity(tmp_path, tokenizer, model):
    from lmforge.tokenizer.pack import tokenize_to_shards

    (tmp_path / "text.txt").write_text(TEXT[:20_000])
    tokenize_to_shards([tmp_path / "text.txt"], tokenizer, tmp_path / "shards", val_fraction=0.0)
    save_model(model, tmp_path / "model")
    tokenizer.save(tmp_path / "model")
    make_cloze_task(tmp_path / "tasks", tmp_path / "text.txt", n=10)
    make_synthetic_task(tmp_path / "tasks", n=6)
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "model"), "--data", str(tmp_path / "shards"),
                 "--tasks", str(tmp_path / "tasks"), "--max-batches", "2", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["loss"] > 0 and set(record["tasks"]) == {"cloze", "synthetic"}
    assert record["tasks"]["cloze"]["n"] == 10 and 0 <= record["tasks"]["cloze"]["acc_norm"] <= 1
    assert len(record["tasks"]["synthetic"]["examples"]) == 6
    same = run_tasks(model, tokenizer, [tmp_path / "tasks" / "cloze.yaml"])
    assert same["cloze"]["acc"] == record["tasks"]["cloze"]["acc"]
    assert main(["eval", "--checkpoint", str(tmp_path / "model")]) == 1  # nothing to do: one-line error


def test_tally_hand_computed():
    assert tally([1, 0, 1, 0.5], [0, 0, 1, 0.7]) == {"n": 4, "wins": 1, "ties": 2, "losses": 1, "win_rate": 0.5}
    assert tally([1, 1], [0, 1])["win_rate"] == 0.75


def test_win_rate_verifier_and_reward_judges(tmp_path, tokenizer, model):
    from lmforge.posttrain.reward import RewardModel, save_reward_model

    torch.manual_seed(5)
    other = Transformer(model.cfg).eval()
    same = win_rate(model, model, tokenizer, n=12, max_new_tokens=6)
    assert same["ties"] == 12 and same["win_rate"] == 0.5
    r = win_rate(model, other, tokenizer, n=12, max_new_tokens=6)
    assert r["wins"] + r["ties"] + r["losses"] == 12
    # with 0/1 verifier scores, wins - losses = correct(A) - correct(B)
    assert r["win_rate"] == pytest.approx(0.5 + (r["accuracy_a"] - r["accuracy_b"]) / 2)
    rm = RewardModel(other).eval()
    assert win_rate(model, model, tokenizer, n=6, judge="reward", reward_model=rm, max_new_tokens=4)["win_rate"] == 0.5
    acc = reward_accuracy(rm, tokenizer, n=20)
    assert acc["n"] == 20 and 0 <= acc["reward_accuracy"] <= 1
    save_model(model, tmp_path / "a")
    tokenizer.save(tmp_path / "a")
    save_reward_model(rm, tmp_path / "rm")
    out = tmp_path / "eval" / "winrate.json"
    assert main(["eval", "winrate", "--checkpoint", str(tmp_path / "a"), "--baseline", str(tmp_path / "a"),
                 "--judge", "reward", "--reward-model", str(tmp_path / "rm"), "--n", "4", "--max-new-tokens", "4",
                 "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["tasks"]["winrate"] == {"n": 4, "win_rate": 0.5} and record["tasks"]["reward_model"]["n"] == 4


def test_reward_accuracy_command_counts_chosen_above_rejected(tmp_path, tokenizer, model):
    from lmforge.posttrain.reward import RewardModel, save_reward_model, score_texts

    torch.manual_seed(7)
    rm = RewardModel(Transformer(model.cfg)).eval()
    save_reward_model(rm, tmp_path / "rm")
    tokenizer.save(tmp_path / "rm")
    rows = [{"prompt": f"say {w}", "chosen": w, "rejected": w[::-1] + "x"} for w in ("cat", "dog", "sun", "tree",
                                                                                    "moon", "river")]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    chosen = score_texts(rm, tokenizer, prompts, [r["chosen"] for r in rows])
    rejected = score_texts(rm, tokenizer, prompts, [r["rejected"] for r in rows])
    expected = sum(c > r for c, r in zip(chosen, rejected)) / len(rows)
    out = tmp_path / "acc.json"
    assert main(["eval", "reward-accuracy", "--reward-model", str(tmp_path / "rm"), "--data", str(data),
                 "--output", str(out), "--device", "cpu"]) == 0
    record = json.loads(out.read_text())
    assert record["n"] == 6 and record["reward_accuracy"] == pytest.approx(expected)
    assert main(["eval", "reward-accuracy", "--reward-model", str(tmp_path / "missing")]) != 0
