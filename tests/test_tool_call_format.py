"""The tool-call format without a server (lmref.serving.tool_calls): checking, parsing, streaming."""

import json

import pytest

from lmref.serving.schema import APIError
from lmref.serving.tool_calls import OPEN, ToolStream, call_deltas, parse, tool_grammar, tool_set

pytestmark = pytest.mark.unit

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
CALL = '<tool_call>[{"name": "add", "arguments": {"a": 3, "b": 4}}]</tool_call>'


def test_tool_set_reads_the_choice():
    assert tool_set({}) is None
    assert tool_set({"tools": [ADD], "tool_choice": "none"}) is None
    auto = tool_set({"tools": [ADD]})
    assert (auto.choice, auto.parallel) == ("auto", True) and tool_grammar(auto) is None
    named = tool_set(
        {
            "tools": [ADD],
            "tool_choice": {"type": "function", "function": {"name": "add"}},
            "parallel_tool_calls": False,
        }
    )
    assert (named.choice, named.named, named.parallel) == ("add", True, False)
    assert tool_grammar(named) is not None


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"tool_choice": "required"}, "tool_choice", "only allowed when 'tools'"),
        (
            {"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "mul"}}},
            "tool_choice",
            "'mul'",
        ),
        ({"tools": [ADD, ADD]}, "tools", "twice"),
        ({"tools": [ADD], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
        ({"tools": [ADD], "tool_choice": "always"}, "tool_choice", "'always'"),
    ],
)
def test_bad_tools_are_a_400_naming_the_field(body, param, words):
    with pytest.raises(APIError) as caught:
        tool_set(body)
    assert caught.value.status == 400 and caught.value.param == param
    assert words in str(caught.value)


def test_parse_turns_a_call_into_openai_shape_and_leaves_other_text_alone():
    tools = tool_set({"tools": [ADD]})
    content, calls = parse(CALL, tools)
    assert content is None and len(calls) == 1
    call = calls[0]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "add"
    assert json.loads(call["function"]["arguments"]) == {"a": 3, "b": 4}
    for text in ("The answer is 7.", CALL.replace('"add"', '"mul"'), OPEN + "[{not json"):
        assert parse(text, tools) == (text, [])  # unknown tool or broken JSON: stays text
    assert parse(CALL, None) == (CALL, [])  # no tools in the request: never a call


def test_stream_holds_back_a_possible_call_and_deltas_join_to_the_call():
    tools = tool_set({"tools": [ADD]})
    stream, sent = ToolStream(tools), ""
    text = "Let me add. " + CALL
    for k in range(0, len(text), 5):  # five characters a token
        sent += stream.push(text[k : k + 5])
    assert sent == "Let me add. "  # nothing of the call went out as content
    rest, calls = stream.finish(text)
    assert rest == "" and calls[0]["function"]["name"] == "add"
    deltas = [d for group in call_deltas(calls) for d in group]
    assert deltas[0]["id"] == calls[0]["id"] and deltas[0]["function"]["name"] == "add"
    joined = "".join(d["function"]["arguments"] for d in deltas)
    assert joined == calls[0]["function"]["arguments"]
    plain = ToolStream(tools)
    assert plain.push("no call <tool") == "no call "  # a tail that may open a call waits
    assert plain.finish("no call <tools are fun>") == ("<tools are fun>", [])
