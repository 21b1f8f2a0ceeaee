"""Each source on fixture files in the dataset's real row format, malformed rows counted by reason."""

import json
import os
from collections import Counter

import pytest

from layerroute.data.config import BFCL_DEFAULT_CATEGORIES, DataConfig, SourceConfig
from layerroute.data.records import BadRow, Conversation
from layerroute.data.sources import iter_source
from layerroute.errors import DataError
from layerroute.tasks.bfcl import bfcl_data_dir, bfcl_gold_calls, bfcl_schema
from layerroute.tasks.gsm8k import math_target

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "data")
CFG = DataConfig()


def read(name, path, **kw):
    recs = list(iter_source(SourceConfig(name, path=os.path.join(FIX, path) if path else None, **kw), CFG))
    good = [r for r in recs if isinstance(r, Conversation)]
    bad = Counter(r.reason for r in recs if isinstance(r, BadRow))
    return good, bad


def calls_of(msg):
    return [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls") or []]


def test_hermes_rows():
    good, bad = read("hermes", "hermes_function_calling_v1.json")
    assert bad == Counter(tool_call_invalid_json=1, unknown_role=1, no_assistant_turn=1, tool_call_unclosed=1)
    by_id = {c.id: c for c in good}
    single = by_id["hermes:85f6c398-69c7-4df2-aed1-29d614a93a26"]
    # tools parsed from the Python-literal <tools> block (not the "<tools> </tools>" mention before it)
    assert [t["function"]["name"] for t in single.tools] == ["get_camera_live_feed"]
    assert "<tools>" not in single.messages[0]["content"].split("XML tags")[-1]
    assert calls_of(single.messages[-1]) == [
        ("get_camera_live_feed", {"camera_id": "front_door", "stream_quality": "1080p"})
    ]
    assert single.repairs == ["python_literal_call"]
    multi = by_id["hermes:c3a1e0d2-0001"]
    assert [m["role"] for m in multi.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert (
        json.loads(multi.messages[3]["content"])["content"]["temperature"] == 18
    )  # <tool_response> unwrapped
    parallel = by_id["hermes:c3a1e0d2-0002"]
    assert [n for n, _ in calls_of(parallel.messages[-1])] == ["get_current_weather"] * 2
    assert by_id["hermes:c3a1e0d2-0003"].tools == []


def test_glaive_rows():
    good, bad = read("glaive", "glaive_function_calling_v2.json")
    assert bad == Counter(tool_call_arguments_invalid_json=1, no_assistant_turn=1, unknown_role=1)
    assert len(good) == 4 and len({c.id for c in good}) == 3  # row 7 duplicates row 2: same content-hash id
    news = good[0]
    assert [t["function"]["name"] for t in news.tools] == ["get_news_headlines"]
    assert news.messages[0] == {
        "role": "system",
        "content": "You are a helpful assistant with access to the following functions. Use them if required -",
    }
    assert calls_of(news.messages[2]) == [
        ("get_news_headlines", {"country": "United States"})
    ]  # string-encoded arguments
    assert "string_encoded_arguments" in news.repairs
    assert news.messages[3]["role"] == "tool" and json.loads(news.messages[3]["content"])["headlines"]
    assert news.messages[4]["content"].endswith(
        "Hurricane Ida devastates Louisiana"
    )  # <|endoftext|> stripped
    tip = good[2]
    assert len(tip.tools) == 2
    assert tip.messages[2]["content"] == "Sure, let me calculate that."
    assert calls_of(tip.messages[2]) == [("calculate_tip", {"bill_amount": 50, "tip_percentage": 20})]


def test_gsm8k_hub_rows():
    good, bad = read("gsm8k_hub", "gsm8k_main.jsonl")
    assert bad == Counter(no_final_answer=1, missing_field=1)
    first = good[0].messages[-1]["content"]
    assert (
        first
        == "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\nThe answer is 72."
    )
    assert good[0].meta == {"answer": "72"} and good[0].category == "gsm8k"
    assert (
        good[2].messages[-1]["content"].endswith("The answer is 12000.")
    )  # commas dropped from the final number


def test_gsm8k_jsonl_same_rows_and_limit():
    good, bad = read("gsm8k_jsonl", "gsm8k_main.jsonl", limit=2)
    assert len(good) == 2 and not bad


@pytest.mark.parametrize("split, rows", [("train", 7473), ("test", 1319)])
def test_packaged_gsm8k_is_read_without_a_path_and_a_user_path_reads_the_same(tmp_path, split, rows):
    """GSM8K ships in the package (gzip JSONL); a user's own file, plain or gzip, is read the same way."""
    import gzip

    from layerroute.tasks.gsm8k import packaged_gsm8k

    src = SourceConfig("gsm8k_jsonl", split=split, role="eval")
    assert src.resolved_path == str(packaged_gsm8k(split))
    packaged = [r for r in iter_source(src, CFG)]
    assert len(packaged) == rows and all(isinstance(r, Conversation) for r in packaged)
    plain = tmp_path / f"{split}.jsonl"
    plain.write_text(gzip.decompress(packaged_gsm8k(split).read_bytes()).decode("utf-8"))
    user = list(iter_source(SourceConfig("gsm8k_jsonl", path=str(plain), limit=50), CFG))
    assert [c.messages for c in user] == [c.messages for c in packaged[:50]]
    assert (packaged_gsm8k(split).parent / "LICENSE").read_text().startswith("MIT License")


def test_turing_rows_and_wrong_columns():
    good, bad = read("turing", "turing_open_reasoning.json")
    assert bad == Counter(missing_field=1)
    assert good[0].id == "turing:217998" and good[0].category == "turing:Physics"
    assert good[0].meta["sub_domain"] == "Astrophysics"
    assert good[1].messages[-1]["content"] == "The answer is 2."
    with pytest.raises(DataError, match=r"question column .*answer column.*\['prompt_text', 'response'\]"):
        read("turing", "turing_wrong_columns.json")


def test_jsonl_messages_rows():
    good, bad = read("jsonl", "messages.jsonl")
    assert bad == Counter(unknown_role=1, no_assistant_turn=1, invalid_json_line=1)
    by_id = {c.id: c for c in good}
    assert calls_of(by_id["jsonl:ok-structured"].messages[1]) == [
        ("get_current_weather", {"location": "Berlin, Germany"})
    ]
    s = by_id["jsonl:ok-string-arguments"]
    assert [a["location"] for _, a in calls_of(s.messages[2])] == ["Madrid, Spain", "Lisbon, Portugal"]
    assert s.tools[0]["type"] == "function"  # bare function spec wrapped
    assert calls_of(by_id["jsonl:ok-text-call"].messages[1]) == [
        ("get_current_weather", {"location": "Tokyo, Japan"})
    ]


def test_bfcl_fixture_folder():
    good, bad = read("bfcl", "bfcl", categories=["simple_python"])
    assert bad == Counter(bfcl_missing_ground_truth=1)
    c = good[0]
    assert c.category == "simple_python" and c.meta["bfcl_id"] == "simple_python_0"
    assert c.tools[0]["function"]["parameters"]["type"] == "object"
    assert calls_of(c.messages[-1]) == [
        ("calculate_triangle_area", {"base": 10, "height": 5, "unit": "units"})
    ]


def test_bfcl_schema_and_gold_calls():
    schema = {
        "type": "dict",
        "properties": {
            "f": {"type": "float"},
            "t": {"type": "tuple", "items": {"type": "integer"}},
            "a": {"type": "any"},
            "h": {"type": "HashMap"},
            "d": {"type": "dict", "properties": {"x": {"type": "float", "optional": True}}},
        },
        "required": ["f"],
    }
    out = bfcl_schema(schema)
    assert out["type"] == "object"
    assert out["properties"]["f"] == {"type": "number"}
    assert out["properties"]["t"] == {"type": "array", "items": {"type": "integer"}}
    assert out["properties"]["a"] == {}
    assert out["properties"]["h"] == {"type": "object"}
    assert out["properties"]["d"]["properties"]["x"] == {"type": "number"}
    # live_multiple_0-0-0's ground truth: a nested dict argument with its own acceptable-value lists
    fn = {
        "name": "ChaDri.change_drink",
        "parameters": {
            "type": "dict",
            "properties": {
                "drink_id": {"type": "string"},
                "new_preferences": {"type": "dict", "properties": {}},
            },
        },
    }
    gt = [
        {
            "ChaDri.change_drink": {
                "drink_id": ["latte"],
                "new_preferences": [
                    {
                        "size": ["large"],
                        "milk_type": ["coconut"],
                        "sweetness_level": ["extra"],
                        "special_instructions": ["", "boiling hot"],
                        "note": [""],
                    }
                ],
                "optional_arg": ["", 3],
            }
        }
    ]
    assert bfcl_gold_calls(gt, [fn]) == [
        {
            "name": "ChaDri.change_drink",
            "arguments": {
                "drink_id": "latte",
                "optional_arg": 3,
                "new_preferences": {
                    "size": "large",
                    "milk_type": "coconut",
                    "sweetness_level": "extra",
                    "special_instructions": "boiling hot",
                },
            },
        }
    ]
    # lists are values, not choices, inside the choice list; list-of-dict arguments are concretised per item
    fn2 = {
        "name": "g",
        "parameters": {"type": "dict", "properties": {"xs": {"type": "array", "items": {"type": "dict"}}}},
    }
    assert bfcl_gold_calls([{"g": {"xs": [[{"k": ["v", "w"]}]], "m": [[3, 5]]}}], [fn2]) == [
        {"name": "g", "arguments": {"xs": [{"k": "v"}], "m": [3, 5]}}
    ]


def test_bfcl_package_every_default_category_converts():
    """The real packaged BFCL data: every row converts, no BFCL-only type survives."""
    assert os.path.isdir(bfcl_data_dir())
    good, bad = read("bfcl", None, categories=list(BFCL_DEFAULT_CATEGORIES))
    assert not bad, bad
    assert {c.category for c in good} == set(BFCL_DEFAULT_CATEGORIES)
    bfcl_only = {"dict", "float", "tuple", "any", "HashMap", "String"}

    def types(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "type" and isinstance(v, str):
                    yield v
                if k not in ("default", "enum"):
                    yield from types(v)
        elif isinstance(x, list):
            for v in x:
                yield from types(v)

    assert not {t for c in good for t in types(c.tools)} & bfcl_only
    assert all(c.messages[-1]["tool_calls"] for c in good)


def test_gsm_symbolic_generates_worked_solutions():
    recs = list(iter_source(SourceConfig("gsm_symbolic", limit=4, seed=3), CFG))
    assert len(recs) == 4 and all(isinstance(r, Conversation) for r in recs)
    for r in recs:
        target = r.messages[-1]["content"]
        assert target.endswith(f"The answer is {r.meta['answer']}.") and "####" not in target
    again = list(iter_source(SourceConfig("gsm_symbolic", limit=4, seed=3), CFG))
    assert [r.id for r in again] == [r.id for r in recs]


def test_math_target():
    assert math_target("a <<1+1=2>>2\n#### 1,234") == "a 2\nThe answer is 1234."
    assert math_target("no final line") is None
    assert math_target("just text", final="7") == "just text\nThe answer is 7."


def test_bfcl_gold_calls_stay_inside_their_schema():
    """Issue 36: an optional argument whose BFCL value the schema forbids (outside the enum, null for a string,
    a bool for a string) is left out and the keys follow the schema's order, so the gold call is one the grammar
    allows; an argument the schema requires or the answer insists on (no "") keeps its value. BFCL's checker
    accepts the result; within_schema=False is the rendering before."""
    from layerroute.tasks.bfcl import check_tool_calls, schema_forbids

    fn = {"name": "f", "parameters": {"type": "dict", "required": ["name", "mode"], "properties": {
        "name": {"type": "string"}, "mode": {"type": "string", "enum": ["a", "b"]},
        "unit": {"type": "string", "enum": ["seconds", "milliseconds"]}, "token": {"type": "string"},
        "venue": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string", "enum": ["x", "y"]}},
        "limit": {"type": "integer"}}}}
    gt = [{"f": {"limit": ["", 3], "token": ["", None], "unit": ["N/A", ""], "venue": ["", True], "mode": ["c"],
                 "tags": [["x", "z"], ""], "name": ["n"]}}]
    (new,) = bfcl_gold_calls(gt, [fn])
    assert list(new["arguments"].items()) == [("name", "n"), ("mode", "c"), ("limit", 3)]  # the schema's order
    (old,) = bfcl_gold_calls(gt, [fn], within_schema=False)
    assert list(old["arguments"]) == ["limit", "token", "unit", "venue", "mode", "tags", "name"]
    assert check_tool_calls([new], [fn], gt, "simple_python").valid
    assert schema_forbids(None, {"type": "string"}) and schema_forbids(True, {"type": "integer"})
    assert schema_forbids(["x", "z"], fn["parameters"]["properties"]["tags"])
    assert not schema_forbids(2, {"type": "float"}) and not schema_forbids(None, {"type": "any"})
    assert not schema_forbids(["x"], fn["parameters"]["properties"]["tags"]) and not schema_forbids("q", {})
