"""Tests for the training data modules (training/records.py, formats.py, loaders.py, demo.py) and the
shipped demo data."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from training import demo as td
from training.demo import demo_path
from training.formats import DataFormatError, detect_format
from training.loaders import load_instructions, load_preferences, split_holdout
from training.records import Instruction, PreferencePair, pairs_to_instructions, prompt_key

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]
MAKE_DEMO = REPO / "training" / "data" / "make_demo.py"


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# Loaders on fixtures in their real formats
# --------------------------------------------------------------------------------------------------


def test_hh_rlhf_fixture():
    path = FIXTURES / "hh_rlhf_sample.jsonl"
    assert detect_format(read_rows(path)) == "hh-rlhf"
    pairs = load_preferences(path)
    assert pairs == load_preferences(path, format="hh-rlhf")
    assert pairs == [
        PreferencePair(
            user("What is a good way to keep cut flowers fresh?"),
            "Trim the stems at an angle and change the water every two days.",
            "Just put them somewhere.",
        ),
        PreferencePair(
            [
                {"role": "user", "content": "Can you recommend a board game for four players?"},
                {
                    "role": "assistant",
                    "content": "Ticket to Ride works well with four players and is easy to learn.",
                },
                {"role": "user", "content": "How long does a game usually take?"},
            ],
            "Most games take about an hour once everyone knows the rules.",
            "It depends.",
        ),
        PreferencePair(
            [
                {"role": "user", "content": "I want to write a short poem about rain."},
                {"role": "assistant", "content": "Sure. Do you want it to rhyme?"},
                {"role": "user", "content": "Yes, two lines please."},
                {
                    "role": "assistant",
                    "content": "Here you go:\nSoft rain taps upon the pane,\nwashing dust from every lane.",
                },
                {"role": "user", "content": "Thanks! Can you give it a title?"},
            ],
            'How about "Window Rain"?',
            "No, think of one yourself.",
        ),
    ]


def test_ultrafeedback_fixture():
    path = FIXTURES / "ultrafeedback_sample.jsonl"
    rows = read_rows(path)
    assert set(rows[0]) == {
        "prompt",
        "prompt_id",
        "chosen",
        "rejected",
        "messages",
        "score_chosen",
        "score_rejected",
    }
    assert detect_format(rows) == "ultrafeedback"
    pairs = load_preferences(path)
    assert len(pairs) == 3
    assert pairs[0] == PreferencePair(
        user("Explain in one sentence why the sky looks blue."),
        "Sunlight scatters off air molecules, and blue light scatters much more than red, "
        "so the sky looks blue.",
        "The sky is blue because it reflects the ocean.",
    )
    assert pairs[1].chosen == "Red leaves drift and fall\nwhispering on the cold path\nautumn says goodbye"
    assert pairs[2].prompt == user("Give me two synonyms for 'happy'.")
    assert pairs[2].rejected == "Happy means happy."
    # Messages keep only role and content, in the usual key order.
    assert list(pairs[0].prompt[0]) == ["role", "content"]


def test_ultrafeedback_reply_only_lists_use_prompt_field(tmp_path):
    path = write_jsonl(
        tmp_path / "trl.jsonl",
        [
            {
                "prompt": "Hi?",
                "chosen": [{"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "assistant", "content": "What."}],
            },
            {
                "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
                "chosen": [{"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "assistant", "content": "What."}],
            },
        ],
    )
    pairs = load_preferences(path)
    assert pairs[0] == PreferencePair(user("Hi?"), "Hello!", "What.")
    assert pairs[1].prompt == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]


def test_plain_jsonl_preferences_fixture():
    path = FIXTURES / "pref_sample.jsonl"
    assert detect_format(read_rows(path)) == "jsonl"
    pairs = load_preferences(path)
    assert pairs == [
        PreferencePair(
            user("How do I make my bread rise more?"),
            "Let the dough rest somewhere warm until it doubles in size.",
            "Bread rises by itself.",
        ),
        PreferencePair(
            [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "4."},
                {"role": "user", "content": "And times 3?"},
            ],
            "(2 + 2) x 3 = 12.",
            "7.",
        ),
        PreferencePair(user("Name a primary color."), "Red is a primary color.", "Pink."),
    ]
    assert pairs[0].chosen_messages() == [
        *user("How do I make my bread rise more?"),
        {"role": "assistant", "content": "Let the dough rest somewhere warm until it doubles in size."},
    ]
    assert pairs[2].rejected_messages()[-1] == {"role": "assistant", "content": "Pink."}


def test_instructions_fixture():
    path = FIXTURES / "inst_sample.jsonl"
    assert detect_format(read_rows(path)) == "jsonl"
    items = load_instructions(path)
    assert items == [
        Instruction(user("What is the capital of Italy?"), "The capital of Italy is Rome."),
        Instruction(
            [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "How many days are in a week?"},
            ],
            "Seven.",
        ),
        Instruction(
            [
                {"role": "user", "content": "Say hi."},
                {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": "Say bye."},
            ],
            "Bye!",
        ),
    ]
    assert items[0].prompt is items[0].messages_prompt
    assert items[1].messages()[-1] == {"role": "assistant", "content": "Seven."}


def test_limit(tmp_path):
    assert len(load_preferences(FIXTURES / "hh_rlhf_sample.jsonl", limit=2)) == 2
    assert load_instructions(FIXTURES / "inst_sample.jsonl", limit=1) == [
        Instruction(user("What is the capital of Italy?"), "The capital of Italy is Rome.")
    ]
    # Rows past the limit are not read, so a broken tail does not matter.
    path = tmp_path / "tail.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{broken\n', encoding="utf-8")
    assert len(load_instructions(path, limit=1)) == 1
    with pytest.raises(ValueError, match="limit"):
        load_instructions(path, limit=-1)


def test_json_list_and_json_lines_files(tmp_path):
    rows = read_rows(FIXTURES / "pref_sample.jsonl")
    as_list = tmp_path / "prefs.json"
    as_list.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    as_lines = tmp_path / "prefs_lines.json"
    as_lines.write_text((FIXTURES / "pref_sample.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    expected = load_preferences(FIXTURES / "pref_sample.jsonl")
    assert load_preferences(as_list) == expected
    assert load_preferences(as_lines) == expected


def test_parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = read_rows(FIXTURES / "ultrafeedback_sample.jsonl")
    path = tmp_path / "uf.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_preferences(path) == load_preferences(FIXTURES / "ultrafeedback_sample.jsonl")


def test_datasets_save_to_disk_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    rows = read_rows(FIXTURES / "ultrafeedback_sample.jsonl")
    expected = load_preferences(FIXTURES / "ultrafeedback_sample.jsonl")
    folder = tmp_path / "uf_dict"
    datasets.DatasetDict(
        {
            "train_prefs": datasets.Dataset.from_list(rows[:2]),
            "test_prefs": datasets.Dataset.from_list(rows[2:]),
        }
    ).save_to_disk(str(folder))
    assert load_preferences(folder, split="train_prefs") == expected[:2]
    assert load_preferences(folder, split="test_prefs") == expected[2:]
    with pytest.raises(DataFormatError, match=r"has splits \['train_prefs', 'test_prefs'\]; pass split="):
        load_preferences(folder)
    with pytest.raises(DataFormatError, match="has no split 'validation'"):
        load_preferences(folder, split="validation")

    single = tmp_path / "inst_single"
    datasets.Dataset.from_list(
        [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]
    ).save_to_disk(str(single))
    assert load_instructions(single) == [Instruction(user("p1"), "r1"), Instruction(user("p2"), "r2")]

    bad = tmp_path / "bad_dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([{"prompt": "p", "chosen": "c"}])}
    ).save_to_disk(str(bad))
    with pytest.raises(DataFormatError) as info:
        load_preferences(bad)
    assert str(info.value) == f"{bad}[train] row 1: missing field 'rejected'"


def test_datasets_folder_without_datasets_package(tmp_path, monkeypatch):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text('{"splits": ["train"]}', encoding="utf-8")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        load_preferences(folder)


# --------------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"},
            "hh-rlhf",
        ),
        ({"chosen": [{"role": "user", "content": "a"}], "rejected": []}, "ultrafeedback"),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "jsonl"),
        ({"prompt": "\n\nHuman: hi", "chosen": "\n\nAssistant: x", "rejected": "y"}, "jsonl"),
        ({"prompt": "a", "response": "b"}, "jsonl"),
        ({"messages": [{"role": "user", "content": "a"}]}, "jsonl"),
    ],
)
def test_detect_format(row, expected):
    assert detect_format([row]) == expected


def test_detect_format_errors():
    with pytest.raises(DataFormatError, match="no rows"):
        detect_format([])
    with pytest.raises(
        DataFormatError, match=r"cannot detect the data format from fields \['answer', 'question'\]"
    ):
        detect_format([{"question": "a", "answer": "b"}])
    with pytest.raises(DataFormatError, match="cannot detect"):
        detect_format([{"chosen": "no transcript markers", "rejected": "x"}])


def test_unknown_format_name():
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        load_preferences(FIXTURES / "pref_sample.jsonl", format="csv")


# --------------------------------------------------------------------------------------------------
# Errors name the file, the row and the field
# --------------------------------------------------------------------------------------------------


def test_missing_field_names_file_row_and_field(tmp_path):
    path = tmp_path / "data.jsonl"
    # Row numbers are line numbers: the blank line counts.
    path.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "d", "chosen": "e"}\n',
        encoding="utf-8",
    )
    with pytest.raises(DataFormatError) as info:
        load_preferences(path)
    assert str(info.value) == f"{path} row 3: missing field 'rejected'"
    assert (info.value.source, info.value.row, info.value.field) == (str(path), 3, "rejected")


def test_malformed_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": }\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"broken\.jsonl row 2: invalid JSON: Expecting value") as info:
        load_instructions(path)
    assert info.value.row == 2


def test_malformed_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"prompt": "a", "response": "b"},\n {"prompt": ]', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"broken\.json: invalid JSON: Expecting value \(line 2"):
        load_instructions(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    for name in ("empty.jsonl", "empty.json"):
        path = tmp_path / name
        path.write_text(content, encoding="utf-8")
        with pytest.raises(DataFormatError, match=rf"{name}: no rows \(the file or split is empty\)"):
            load_preferences(path)
        with pytest.raises(DataFormatError, match="no rows"):
            load_instructions(path)


@pytest.mark.parametrize(
    ("row", "fmt", "message"),
    [
        ({"prompt": "a", "chosen": 3, "rejected": "c"}, "auto", "field 'chosen' must be a string, got int"),
        ({"prompt": "a", "chosen": "  ", "rejected": "c"}, "auto", "field 'chosen' is empty"),
        ({"prompt": "", "chosen": "b", "rejected": "c"}, "auto", "field 'prompt' is empty"),
        (
            {"prompt": {"x": 1}, "chosen": "b", "rejected": "c"},
            "jsonl",
            "field 'prompt' must be a string or a list of messages, got object",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "chosen": "c",
                "rejected": "d",
            },
            "auto",
            "the prompt in field 'prompt' must end with a user message, not 'assistant'",
        ),
        (
            {"prompt": [{"role": "robot", "content": "a"}], "chosen": "c", "rejected": "d"},
            "auto",
            "field 'prompt[0].role' must be one of",
        ),
        (
            {"prompt": [{"role": "user"}], "chosen": "c", "rejected": "d"},
            "auto",
            "missing field 'prompt[0].content'",
        ),
        (
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}],
            },
            "auto",
            "the last message of field 'chosen' must be from the assistant, not 'user'",
        ),
        (
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "rejected": [{"role": "user", "content": "X"}, {"role": "assistant", "content": "c"}],
            },
            "auto",
            "the messages before the final reply differ between 'chosen' and 'rejected'",
        ),
        (
            {
                "chosen": [{"role": "assistant", "content": "b"}],
                "rejected": [{"role": "assistant", "content": "c"}],
            },
            "auto",
            "missing field 'prompt'",
        ),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: OTHER\n\nAssistant: c"},
            "auto",
            "the conversation before the final reply differs between 'chosen' and 'rejected'",
        ),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant:  ", "rejected": "\n\nHuman: a\n\nAssistant: c"},
            "auto",
            "the final assistant reply in field 'chosen' is empty",
        ),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "no turns here"},
            "hh-rlhf",
            "field 'rejected' has no '\\n\\nAssistant:' turn",
        ),
        (
            {"chosen": "intro\n\nHuman: a\n\nAssistant: b", "rejected": "intro\n\nHuman: a\n\nAssistant: c"},
            "auto",
            "field 'chosen' has text before its first 'Human:' turn",
        ),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
            "jsonl",
            "missing field 'prompt'",
        ),
    ],
)
def test_invalid_preference_rows(tmp_path, row, fmt, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataFormatError) as info:
        load_preferences(path, format=fmt)
    assert str(info.value).startswith(f"{path} row 1: ")
    assert message in str(info.value)


def test_non_object_row(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "response": "b"}, ["not", "an", "object"]])
    with pytest.raises(DataFormatError, match=r"rows\.jsonl row 2: expected a JSON object, got list"):
        load_instructions(path)


def test_invalid_instruction_rows(tmp_path):
    cases = [
        ({"prompt": "a"}, "row 1: missing field 'response'"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            "the last message of field 'messages' must be from the assistant",
        ),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "holds only the assistant reply"),
        (
            {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
            "the prompt in field 'messages' must end with a user message, not 'system'",
        ),
    ]
    for row, message in cases:
        path = write_jsonl(tmp_path / "inst.jsonl", [row])
        with pytest.raises(DataFormatError, match=message):
            load_instructions(path)
    path = write_jsonl(tmp_path / "inst.jsonl", [{"prompt": "a", "response": "b"}, {"response": "c"}])
    with pytest.raises(DataFormatError, match=r"row 2: missing field 'prompt' \(or 'messages'\)"):
        load_instructions(path)


def test_instructions_refuse_preference_data():
    with pytest.raises(DataFormatError, match="holds preference data .*'hh-rlhf'.*use load_preferences"):
        load_instructions(FIXTURES / "hh_rlhf_sample.jsonl")


def test_skip_invalid(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "a", "chosen": "b", "rejected": "c"},
            {"prompt": "d", "chosen": "e"},
            {"prompt": "f", "chosen": "g", "rejected": "h"},
        ],
    )
    with caplog.at_level("WARNING"):
        pairs = load_preferences(path, skip_invalid=True)
    assert [p.prompt[0]["content"] for p in pairs] == ["a", "f"]
    assert "skipped 1 invalid row" in caplog.text


def test_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_preferences(tmp_path / "missing.jsonl")
    with pytest.raises(DataFormatError, match=r"unsupported file type '\.csv'"):
        (tmp_path / "x.csv").write_text("a,b\n", encoding="utf-8")
        load_preferences(tmp_path / "x.csv")
    with pytest.raises(DataFormatError, match="not one written by the datasets package"):
        load_preferences(tmp_path)
    with pytest.raises(DataFormatError, match="split='train' applies only to datasets save_to_disk folders"):
        load_preferences(FIXTURES / "pref_sample.jsonl", split="train")


# --------------------------------------------------------------------------------------------------
# Data model and helpers
# --------------------------------------------------------------------------------------------------


def test_dataclasses_accept_string_prompts_and_validate():
    assert PreferencePair("hi", "a", "b").prompt == user("hi")
    assert Instruction("hi", "a").messages_prompt == user("hi")
    with pytest.raises(ValueError, match="end with a user message"):
        PreferencePair([{"role": "assistant", "content": "x"}], "a", "b")
    with pytest.raises(ValueError, match="at least one message"):
        Instruction([], "a")


def test_pairs_to_instructions_and_prompt_key():
    pairs = load_preferences(FIXTURES / "pref_sample.jsonl")
    chosen = pairs_to_instructions(pairs)
    rejected = pairs_to_instructions(pairs, "rejected")
    assert [i.response for i in chosen] == [p.chosen for p in pairs]
    assert [i.response for i in rejected] == [p.rejected for p in pairs]
    assert all(i.prompt == p.prompt and i.prompt is not p.prompt for i, p in zip(chosen, pairs, strict=True))
    assert prompt_key(chosen[0]) == prompt_key(pairs[0]) == (("user", "How do I make my bread rise more?"),)
    with pytest.raises(ValueError):
        pairs_to_instructions(pairs, "neither")  # type: ignore[arg-type]


def test_split_holdout_is_deterministic_and_keeps_order():
    items = list(range(100))
    train, held = split_holdout(items, fraction=0.2, seed=3)
    assert (train, held) == split_holdout(items, fraction=0.2, seed=3)
    assert len(held) == 20 and len(train) == 80
    assert sorted(train + held) == items
    assert train == sorted(train) and held == sorted(held)
    assert split_holdout(items, fraction=0.2, seed=4)[1] != held
    assert split_holdout(items, fraction=0.0) == (items, [])
    assert len(split_holdout([1, 2, 3], fraction=0.01)[1]) == 1  # at least one held out
    assert split_holdout([1], fraction=0.5) == ([1], [])
    with pytest.raises(ValueError, match="fraction"):
        split_holdout(items, fraction=1.0)


def test_split_holdout_groups_by_key():
    pairs = [PreferencePair(f"q{i % 10}", f"c{i}", f"r{i}") for i in range(50)]
    train, held = split_holdout(pairs, fraction=0.3, seed=0, key=prompt_key)
    assert {prompt_key(p) for p in train}.isdisjoint({prompt_key(p) for p in held})
    assert len(train) + len(held) == 50 and len(held) == 15


# --------------------------------------------------------------------------------------------------
# Shipped demo data
# --------------------------------------------------------------------------------------------------


def test_demo_path():
    assert demo_path("tone_pref", "train") == demo_path("tone_pref_train")
    assert demo_path("tone_pref_train.jsonl") == td.DEMO_DIR / "tone_pref_train.jsonl"
    assert demo_path("signoff_inst", "test").name == "signoff_inst_test.jsonl"
    for name in td.DEMO_SETS:
        for split in ("train", "test"):
            assert demo_path(name, split).is_file()
    with pytest.raises(FileNotFoundError, match="available: .*tone_pref_train"):
        demo_path("nope")


def test_tone_preference_demo():
    train = load_preferences(demo_path("tone_pref", "train"))
    test = load_preferences(demo_path("tone_pref", "test"))
    assert (len(train), len(test)) == (336, 84)
    for split in (train, test):
        keys = [prompt_key(p) for p in split]
        assert len(set(keys)) == len(keys)
        for pair in split:
            assert len(pair.prompt) == 1 and pair.chosen != pair.rejected
            assert len(pair.chosen.split()) < 60 and len(pair.rejected.split()) < 60
    assert {prompt_key(p) for p in train}.isdisjoint({prompt_key(p) for p in test})


def test_signoff_instruction_demo():
    train = load_instructions(demo_path("signoff_inst", "train"))
    test = load_instructions(demo_path("signoff_inst", "test"))
    assert (len(train), len(test)) == (312, 72)
    for split in (train, test):
        keys = [prompt_key(i) for i in split]
        assert len(set(keys)) == len(keys)
        for item in split:
            assert item.response.endswith("\n" + td.SIGNOFF)
            assert item.response.count(td.SIGNOFF) == 1
            assert len(item.response.split()) < 50
    assert {prompt_key(i) for i in train}.isdisjoint({prompt_key(i) for i in test})
    # Held-out answers are new too, not only rephrased questions.
    assert {i.response for i in train}.isdisjoint({i.response for i in test})


def test_tone_demo_vader_scores():
    vader = pytest.importorskip("vaderSentiment.vaderSentiment")
    analyzer = vader.SentimentIntensityAnalyzer()
    for split in ("train", "test"):
        pairs = load_preferences(demo_path("tone_pref", split))
        chosen = [analyzer.polarity_scores(p.chosen)["compound"] for p in pairs]
        rejected = [analyzer.polarity_scores(p.rejected)["compound"] for p in pairs]
        assert sum(chosen) / len(chosen) > 0.5
        assert sum(rejected) / len(rejected) < -0.3
        assert all(c > 0.5 and r < -0.3 for c, r in zip(chosen, rejected, strict=True))


def _load_make_demo():
    spec = importlib.util.spec_from_file_location("steerserve_make_demo", MAKE_DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_demo_reproduces_committed_files(tmp_path):
    result = subprocess.run(
        [sys.executable, str(MAKE_DEMO), "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(
        [
            "tone_pref_train.jsonl",
            "tone_pref_test.jsonl",
            "signoff_inst_train.jsonl",
            "signoff_inst_test.jsonl",
        ]
    ), result.stdout
    for name in written:
        assert (tmp_path / name).read_bytes() == demo_path(name).read_bytes(), name


def test_make_demo_is_seeded_and_shares_the_signoff(tmp_path):
    make_demo = _load_make_demo()
    assert make_demo.SIGNOFF is td.SIGNOFF  # imported from training.demo, not a copy
    other = make_demo.write_demo(tmp_path, seed=1)
    # ... and what it writes ends with it
    signoff = load_instructions(tmp_path / "signoff_inst_train.jsonl")
    assert all(item.response.endswith("\n" + td.SIGNOFF) for item in signoff)
    assert [p.name for p in other] == [
        "tone_pref_train.jsonl",
        "tone_pref_test.jsonl",
        "signoff_inst_train.jsonl",
        "signoff_inst_test.jsonl",
    ]
    assert (tmp_path / "tone_pref_train.jsonl").read_bytes() != demo_path("tone_pref_train").read_bytes()
    assert len(load_preferences(tmp_path / "tone_pref_train.jsonl")) == 336
