import json

import pytest
from textdata import shared_file

from lmforge.core.errors import LmforgeError
from lmforge.data.formats import read_conversations, read_preference_pairs


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_alpaca_json_array_and_jsonl(tmp_path):
    records = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
               {"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be brief."}]
    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps(records, indent=2), encoding="utf-8")
    for path in (array, write_jsonl(tmp_path / "alpaca.jsonl", records)):
        convs = read_conversations(path)
        assert convs[0].messages == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                                     {"role": "assistant", "content": "5"}]
        assert convs[1].messages == [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    assert read_conversations(tmp_path / "alpaca.jsonl")[1].source.endswith("alpaca.jsonl:2")
    assert read_conversations(array)[1].source.endswith("alpaca.json:7")  # the line the second object starts on


def test_sharegpt_chat_oasst_flan(tmp_path):
    write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [
        {"from": "system", "value": "sys"}, {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}])
    assert [m["role"] for m in read_conversations(tmp_path / "sg.jsonl")[0].messages] == [
        "system", "user", "assistant", "user", "assistant"]
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": "a"}]}])
    assert read_conversations(tmp_path / "chat.jsonl")[0].messages[1] == {"role": "assistant", "content": "a"}
    tree = {"message_tree_id": "t", "prompt": {"role": "prompter", "text": "q", "replies": [
        {"role": "assistant", "text": "worse", "rank": 1, "replies": []},
        {"role": "assistant", "text": "best", "rank": 0, "replies": [{"role": "prompter", "text": "q2", "replies": [
            {"role": "assistant", "text": "a2", "replies": []}]}]}]}}
    write_jsonl(tmp_path / "oasst.jsonl", [tree])
    assert [m["content"] for m in read_conversations(tmp_path / "oasst.jsonl")[0].messages] == ["q", "best", "q2", "a2"]
    write_jsonl(tmp_path / "flan.jsonl", [{"inputs": "Premise: x. Does it follow?", "targets": "yes"},
                                          {"inputs_pretokenized": "Q?", "targets_pretokenized": "A"}])
    convs = read_conversations(tmp_path / "flan.jsonl")
    assert convs[0].messages[1]["content"] == "yes" and convs[1].messages[0]["content"] == "Q?"


def test_real_self_instruct_seed_tasks():
    path = shared_file("self_instruct_seed_tasks.jsonl")
    if path is None:
        pytest.skip("shared/data/self_instruct_seed_tasks.jsonl not present")
    convs = read_conversations(path)
    assert len(convs) == 175
    assert all(c.messages[-1]["role"] == "assistant" and c.messages[-1]["content"] for c in convs)
    assert convs[1].messages[0]["content"].startswith("What is the relation between the given pairs?\n\nNight")


@pytest.mark.parametrize("record, problem", [
    ({"instruction": "x"}, "line 2: missing field 'output'"),
    ({"instruction": "x", "output": ""}, "field 'output' is empty"),
    ({"instruction": 3, "output": "y"}, "field 'instruction' must be a string"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0].from"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q2"}]}, "ends with a user message"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
    ({"what": 1}, "unknown conversation format"),
])
def test_bad_conversation_records_name_file_line_field(tmp_path, record, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok", "output": "fine"}, record])
    with pytest.raises(LmforgeError) as err:
        read_conversations(path)
    assert "bad.jsonl:2" in str(err.value) and problem.split("line 2: ")[-1] in str(err.value)


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n', encoding="utf-8")
    with pytest.raises(LmforgeError, match="broken.jsonl:2: malformed JSON"):
        read_conversations(path)


def test_preference_formats(tmp_path):
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks",
          "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: go away"}
    shp = {"history": "Why is the sky blue?", "human_ref_A": "Rayleigh scattering", "human_ref_B": "magic",
           "labels": 1}
    shp_b = {**shp, "labels": 0}
    pku = {"prompt": "p", "response_0": "bad", "response_1": "good", "better_response_id": 1}
    se = {"question": "q", "response_j": "better", "response_k": "worse"}
    plain = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "c"}],
             "rejected": "r"}
    write_jsonl(tmp_path / "prefs.jsonl", [hh, shp, shp_b, pku, se, plain])
    pairs = read_preference_pairs(tmp_path / "prefs.jsonl")
    assert pairs[0].prompt == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                               {"role": "user", "content": "how are you?"}]
    assert (pairs[0].chosen, pairs[0].rejected) == ("fine, thanks", "go away")
    assert (pairs[1].chosen, pairs[1].rejected) == ("Rayleigh scattering", "magic")
    assert (pairs[2].chosen, pairs[2].rejected) == ("magic", "Rayleigh scattering")
    assert (pairs[3].chosen, pairs[3].rejected) == ("good", "bad")
    assert (pairs[4].chosen, pairs[4].rejected) == ("better", "worse")
    assert (pairs[5].prompt, pairs[5].chosen, pairs[5].rejected) == ([{"role": "user", "content": "q"}], "c", "r")
    assert pairs[3].source.endswith("prefs.jsonl:4")


@pytest.mark.parametrize("record, problem", [
    ({"prompt": "q", "chosen": "c"}, "missing field 'rejected'"),
    ({"prompt": "q", "rejected": "r"}, "missing field 'chosen'"),
    ({"prompt": "q", "chosen": "  ", "rejected": "r"}, "field 'chosen' is empty"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: OTHER\n\nAssistant: c"}, "differ"),
    ({"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 2}, "field 'labels'"),
    ({"nothing": 1}, "missing field 'chosen'/'rejected'"),
])
def test_bad_preference_records(tmp_path, record, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "c", "rejected": "r"}, record])
    with pytest.raises(LmforgeError) as err:
        read_preference_pairs(path)
    assert "bad.jsonl:2" in str(err.value) and problem in str(err.value)


def test_unknown_format_name(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "q", "chosen": "c", "rejected": "r"}])
    with pytest.raises(LmforgeError, match="unknown preference format"):
        read_preference_pairs(path, format="nope")
    with pytest.raises(LmforgeError, match="unknown conversation format"):
        read_conversations(path, format="nope")


def test_compressed_jsonl_and_directories(tmp_path):
    import gzip

    (tmp_path / "d").mkdir()
    with gzip.open(tmp_path / "d" / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    write_jsonl(tmp_path / "d" / "b.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": "a"}]}])
    convs = read_conversations(tmp_path / "d")
    assert [c.messages[-1]["content"] for c in convs] == ["hi", "a"]
    assert convs[0].source.endswith("a.jsonl.gz:1")
