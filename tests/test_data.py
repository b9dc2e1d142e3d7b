"""Prompt files in verl's layout: reading, chat templates, length filtering, GSM8K / reasoning-gym writers, bad input."""
import json

import pytest

from hybridrl import HybridRLError
from hybridrl.data import (GSM8K_INSTRUCTION, load_prompts, prepare_gsm8k, prepare_reasoning_gym, read_rows,
                           write_rows)


def row(content="What is 2 plus 3?", gt="5", i=0):
    return {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": content}], "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": gt}, "extra_info": {"split": "test", "index": i}}


@pytest.fixture(scope="module")
def gsm8k_file(tmp_path_factory):
    return prepare_gsm8k(tmp_path_factory.mktemp("gsm8k"))


@pytest.mark.parametrize("suffix", ["parquet", "jsonl", "json"])
def test_write_then_read_rows(tmp_path, suffix):
    rows = [row(), row("Add 1 and 1.", "2", 1)]
    path = write_rows(rows, tmp_path / "sub" / f"d.{suffix}")
    assert read_rows(path) == rows


def test_load_prompts_applies_chat_template(tmp_path, tiny_tok):
    path = write_rows([row(), row("Add 1 and 1.", "2", 1)], tmp_path / "d.parquet")
    samples = load_prompts([path], tiny_tok, max_prompt_length=256)
    assert [s.index for s in samples] == [0, 1]
    first = samples[0]
    expected = "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tok.decode(first.prompt_ids) == expected
    assert first.prompt_ids == tiny_tok(expected, add_special_tokens=False)["input_ids"]
    assert (first.data_source, first.ground_truth) == ("openai/gsm8k", "5")
    assert first.extra_info == {"split": "test", "index": 0}
    assert first.raw_prompt == [{"role": "user", "content": "What is 2 plus 3?"}]
    assert first.response_ids == [] and samples[1].ground_truth == "2"


def test_load_prompts_string_prompt_custom_key_and_max_samples(tmp_path, tiny_tok):
    rows = [{"question": f"Add {i} and 1.", "data_source": "x", "ground_truth": str(i + 1)} for i in range(5)]
    path = write_rows(rows, tmp_path / "d.jsonl")
    samples = load_prompts(path, tiny_tok, 256, prompt_key="question", max_samples=3)
    assert len(samples) == 3 and samples[2].ground_truth == "3"
    assert samples[0].raw_prompt == [{"role": "user", "content": "Add 0 and 1."}]


def test_load_prompts_many_files_keep_one_index(tmp_path, tiny_tok):
    a = write_rows([row(i=0)], tmp_path / "a.parquet")
    b = write_rows([row(i=0), row(i=1)], tmp_path / "b.jsonl")
    assert [s.index for s in load_prompts([a, b], tiny_tok, 256)] == [0, 1, 2]


def test_load_prompts_drops_long_prompts_and_says_how_many(tmp_path, tiny_tok, capsys):
    rows = [row("short"), row("long " * 200), row("also short")]
    samples = load_prompts([write_rows(rows, tmp_path / "d.parquet")], tiny_tok, max_prompt_length=40)
    assert [s.raw_prompt[0]["content"] for s in samples] == ["short", "also short"]
    assert [s.index for s in samples] == [0, 2]
    assert "dropped 1 of 3 prompts longer than max_prompt_length=40" in capsys.readouterr().out


# ---------------------------------------------------------------- bad input

def test_missing_file(tmp_path, tiny_tok):
    with pytest.raises(HybridRLError, match=r"data file .*nope.parquet not found.*prepare-data"):
        load_prompts([str(tmp_path / "nope.parquet")], tiny_tok, 256)


def test_unreadable_file(tmp_path, tiny_tok):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(HybridRLError, match=r"cannot read data file .*bad.parquet"):
        load_prompts([str(bad)], tiny_tok, 256)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(HybridRLError, match=r"cannot read data file .*broken.jsonl"):
        read_rows(broken)


def test_jsonl_parse_error_names_the_line_in_the_file(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c",}\n{"prompt": "d"}\n')
    with pytest.raises(HybridRLError, match=r"cannot read data file .*broken.jsonl, line 4: not valid JSON "
                                            r"\(.*column 16\): '\{\"prompt\": \"c\",\}'"):
        read_rows(broken)
    as_json = tmp_path / "list.json"   # a JSON list over many lines, broken on line 3
    as_json.write_text('[\n {"prompt": "a"},\n {"prompt": "b" "c"}\n]\n')
    with pytest.raises(HybridRLError, match=r"list.json, line 3: not valid JSON"):
        read_rows(as_json)
    lines = tmp_path / "lines.json"    # ".json" holding JSON lines, broken on line 2
    lines.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(HybridRLError, match=r"lines.json, line 2: not valid JSON"):
        read_rows(lines)


def test_directory_given_as_a_data_file(tmp_path, tiny_tok):
    with pytest.raises(HybridRLError, match=rf"data file {tmp_path} is a directory, expected a parquet/jsonl file; "
                                            r"fix: .*holds no .*prepare-data"):
        load_prompts([str(tmp_path)], tiny_tok, 256)
    write_rows([row()], tmp_path / "train.parquet")
    with pytest.raises(HybridRLError, match=rf"is a directory.*name a file in it: {tmp_path / 'train.parquet'}"):
        read_rows(tmp_path)


def test_unsupported_suffix(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(HybridRLError, match="unsupported type '.csv'"):
        read_rows(tmp_path / "d.csv")


def test_missing_prompt_column_lists_columns(tmp_path, tiny_tok):
    path = write_rows([{"question": "hi", "answer": "1"}], tmp_path / "d.parquet")
    with pytest.raises(HybridRLError, match=r"has no column 'prompt' \(columns: \['answer', 'question'\]\).*prompt_key"):
        load_prompts([path], tiny_tok, 256)


@pytest.mark.parametrize("value", [42, [{"content": "no role"}], [], {"role": "user", "content": "a dict"}])
def test_prompt_of_wrong_type(tmp_path, tiny_tok, value):
    path = write_rows([{"prompt": value}], tmp_path / "d.jsonl")
    with pytest.raises(HybridRLError, match=r"row 0: column 'prompt' is .*expected a list of chat messages"):
        load_prompts([path], tiny_tok, 256)


def test_wrong_type_in_parquet(tmp_path, tiny_tok):
    path = write_rows([{"prompt": 7, "data_source": "x"}], tmp_path / "d.parquet")
    with pytest.raises(HybridRLError, match=r"d.parquet, row 0: column 'prompt' is int"):
        load_prompts([path], tiny_tok, 256)


def test_empty_dataset(tmp_path, tiny_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("")
    with pytest.raises(HybridRLError, match=r"empty.jsonl is empty \(0 rows\)"):
        load_prompts([str(empty_jsonl)], tiny_tok, 256)
    empty_parquet = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty_parquet)
    with pytest.raises(HybridRLError, match=r"empty.parquet is empty \(0 rows\)"):
        load_prompts([str(empty_parquet)], tiny_tok, 256)
    with pytest.raises(HybridRLError, match="no data files given"):
        load_prompts([], tiny_tok, 256)


def test_every_prompt_too_long(tmp_path, tiny_tok):
    path = write_rows([row("a b c " * 20), row("x y " * 40)], tmp_path / "d.parquet")
    lengths = sorted(len(s.prompt_ids) for s in load_prompts([path], tiny_tok, 10_000))
    with pytest.raises(HybridRLError, match=(rf"every prompt .* longer than max_prompt_length=8 tokens \(shortest "
                                             rf"{lengths[0]}, longest {lengths[1]}\).*data.max_prompt_length={lengths[1]}")):
        load_prompts([path], tiny_tok, max_prompt_length=8)


def test_tokenizer_without_chat_template(tmp_path):
    from hybridrl.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(HybridRLError, match="no chat template"):
        load_prompts([write_rows([row()], tmp_path / "d.parquet")], tok, 256)


# ---------------------------------------------------------------- GSM8K

def test_prepare_gsm8k_has_verl_layout(gsm8k_file):
    assert gsm8k_file.endswith("test.parquet")
    rows = read_rows(gsm8k_file)
    assert len(rows) == 1319
    first = rows[0]
    assert set(first) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert first["data_source"] == "openai/gsm8k" and first["ability"] == "math"
    assert first["prompt"] == [{"role": "user", "content": first["extra_info"]["question"] + " " + GSM8K_INSTRUCTION}]
    assert first["prompt"][0]["content"].startswith("Janet’s ducks lay 16 eggs per day.")
    assert first["prompt"][0]["content"].endswith('output the final answer after "####".')
    assert first["reward_model"] == {"style": "rule", "ground_truth": "18"}
    assert first["extra_info"]["split"] == "test" and first["extra_info"]["index"] == 0
    assert first["extra_info"]["answer"].endswith("#### 18")
    assert [r["extra_info"]["index"] for r in rows] == list(range(1319))
    assert all("," not in r["reward_model"]["ground_truth"] for r in rows)
    assert any("," in r["extra_info"]["answer"].split("####")[-1] for r in rows)  # commas were really removed


def test_gsm8k_multi_turn_rows_name_the_calculator(tmp_path, tiny_tok):
    from hybridrl.data import prepare_gsm8k
    rows = read_rows(prepare_gsm8k(tmp_path, multi_turn=True))
    first = rows[0]
    assert len(rows) == 1319 and [m["role"] for m in first["prompt"]] == ["system", "user"]
    assert "calculator" in first["prompt"][0]["content"] and "<tool_call>" in first["prompt"][0]["content"]
    assert first["extra_info"]["tools_kwargs"] == {"calculator": {"create_kwargs": {"ground_truth": "18"}}}
    assert first["reward_model"]["ground_truth"] == "18"
    assert load_prompts([str(tmp_path / "test.parquet")], tiny_tok, 10_000)[0].raw_prompt[0]["role"] == "system"


def test_gsm8k_loads_with_a_chat_template(gsm8k_file, tiny_tok):
    samples = load_prompts([gsm8k_file], tiny_tok, max_prompt_length=100_000, max_samples=20)
    assert len(samples) == 20 and samples[0].ground_truth == "18"
    assert tiny_tok.decode(samples[0].prompt_ids).startswith("<|im_start|>user\nJanet")


# ---------------------------------------------------------------- reasoning-gym

def test_prepare_reasoning_gym_train_and_val(tmp_path, tiny_tok):
    paths = prepare_reasoning_gym("basic_arithmetic", 20, tmp_path, seed=0, val_size=8, max_terms=2, max_digits=1)
    assert set(paths) == {"train", "val"}
    train, val = read_rows(paths["train"]), read_rows(paths["val"])
    assert len(train) == 20 and 0 < len(val) <= 8
    first = train[0]
    assert first["data_source"] == "reasoning_gym/basic_arithmetic"
    assert first["prompt"][0]["content"].endswith('as "Answer: <answer>".')
    entry = json.loads(first["extra_info"]["entry"])
    assert entry["answer"] == first["reward_model"]["ground_truth"]
    assert entry["question"] in first["prompt"][0]["content"]
    assert not {json.loads(r["extra_info"]["entry"])["question"] for r in val} & \
        {json.loads(r["extra_info"]["entry"])["question"] for r in train}  # val never repeats a train problem
    again = read_rows(prepare_reasoning_gym("basic_arithmetic", 20, tmp_path / "b", seed=0, max_terms=2, max_digits=1)["train"])
    assert again == train  # same seed, same problems
    assert len(load_prompts([paths["train"]], tiny_tok, 512)) == 20


def test_prepare_reasoning_gym_custom_instruction(tmp_path):
    path = prepare_reasoning_gym("chain_sum", 3, tmp_path, instruction="Reply with a number.")["train"]
    assert read_rows(path)[0]["prompt"][0]["content"].endswith("\n\nReply with a number.")


def test_prepare_reasoning_gym_unknown_task(tmp_path):
    with pytest.raises(HybridRLError, match=r"unknown reasoning-gym task 'basic_arithmatic'.*basic_arithmetic"):
        prepare_reasoning_gym("basic_arithmatic", 5, tmp_path)


def test_prepare_reasoning_gym_bad_task_option(tmp_path):
    with pytest.raises(HybridRLError, match="rejected its options"):
        prepare_reasoning_gym("basic_arithmetic", 5, tmp_path, no_such_option=3)


def test_error_names_the_row_inside_its_own_file(tmp_path, tiny_tok):
    good = write_rows([row(), row()], tmp_path / "good.jsonl")
    bad = write_rows([row(), {"prompt": 3}], tmp_path / "bad.jsonl")
    with pytest.raises(HybridRLError, match=r"bad.jsonl, row 1: column 'prompt' is int"):
        load_prompts([good, bad], tiny_tok, 256)


def test_chat_template_rejecting_messages(tmp_path):
    from hybridrl.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(HybridRLError, match=r"d.jsonl, row 0: the chat template rejected the messages.*roles must alternate"):
        load_prompts([write_rows([row()], tmp_path / "d.jsonl")], tok, 256)
