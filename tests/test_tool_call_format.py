"""The tool-call format without a server (lmref.serving.tool_calls): checking, parsing, streaming."""

import itertools
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


MUL = {"type": "function", "function": {**ADD["function"], "name": "mul"}}


def streamed(text: str, tools, sizes=(1, 2, 3, 4, 5)):
    """Feed ``text`` to a ToolStream in pieces of 1 to 5 characters (cycling): the content
    sent, every tool_calls delta in order, how many characters had been fed when the first
    delta went out, and what finish owed (content, called)."""
    stream, content, deltas, first, k = ToolStream(tools), "", [], None, 0
    for n in itertools.cycle(sizes):
        if k >= len(text):
            break
        safe, groups = stream.push(text[k : k + n])
        k += n
        content += safe
        deltas += [d for group in groups for d in group]
        first = k if first is None and deltas else first
    owed, groups, called = stream.finish(text)
    deltas += [d for group in groups for d in group]
    return content + owed, deltas, first, called


def joined(deltas: list[dict]) -> dict[int, dict]:
    """Deltas accumulated by index, as the openai client does."""
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d["index"], {"id": None, "name": None, "arguments": ""})
        if "id" in d:
            assert call["id"] is None, "a call's header went out twice"
            call.update(id=d["id"], name=d["function"]["name"])
        call["arguments"] += d["function"]["arguments"]
    return calls


@pytest.mark.parametrize("sizes", [(1,), (5,), (1, 2, 3, 4, 5), (3, 1, 4, 1, 5)])
def test_a_call_streams_its_header_then_its_arguments_as_generated(sizes):
    tools = tool_set({"tools": [ADD]})
    text = "Let me add. " + CALL.replace('"a": 3', '"a": 3, "note": "x}]\\" </tool_call>"')
    content, deltas, first, called = streamed(text, tools, sizes)
    assert content == "Let me add. " and called  # nothing of the call went out as content
    header = text.index('"arguments": {') + len('"arguments": {')
    assert first is not None and first <= header + max(sizes)  # as soon as the name is known
    assert deltas[0]["index"] == 0 and deltas[0]["function"] == {"name": "add", "arguments": ""}
    assert len([d for d in deltas if d["function"]["arguments"]]) >= 2  # not in one piece
    _, calls = parse(text, tools)
    assert joined(deltas)[0]["arguments"] == calls[0]["function"]["arguments"]
    assert json.loads(calls[0]["function"]["arguments"])["b"] == 4


def test_arguments_are_the_models_own_text_in_both_paths():
    tools = tool_set({"tools": [ADD]})
    text = OPEN + '[{"name":"add","arguments":{"b":4,  "a":3, "w": "é"}}]</tool_call>'
    _, calls = parse(text, tools)
    raw = '{"b":4,  "a":3, "w": "é"}'
    assert calls[0]["function"]["arguments"] == raw  # not re-serialised (no \\u00e9)
    assert joined(streamed(text, tools)[1])[0]["arguments"] == raw


def test_parallel_calls_get_an_index_each():
    tools = tool_set({"tools": [ADD, MUL]})
    second = '{"name": "mul", "arguments": {"a": 5, "b": 6}}'
    text = CALL.replace("}}]", "}}, " + second + "]")
    content, deltas, _, called = streamed(text, tools)
    assert content == "" and called
    got, (_, calls) = joined(deltas), parse(text, tools)
    assert sorted(got) == [0, 1] and [got[i]["name"] for i in (0, 1)] == ["add", "mul"]
    assert len({got[0]["id"], got[1]["id"]}) == 2
    assert [got[i]["arguments"] for i in (0, 1)] == [c["function"]["arguments"] for c in calls]
    # the second call's header went out before the block closed
    ends = [i for i, d in enumerate(deltas) if d["index"] == 1 and "id" in d]
    assert ends and ends[0] < len(deltas) - 1


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 7.",
        CALL.replace('"add"', '"mul"'),  # not a known tool: no header ever
        OPEN + "[{not json",
        CALL.replace('{"name": "add", "arguments"', '{"arguments"'),  # no name at all
        CALL.replace(
            '"name": "add", "arguments": {"a": 3, "b": 4}', '"arguments": {"a": 3}, "name": "add"'
        ),
        "no call <tools are fun>",
    ],
)
def test_what_is_not_a_call_of_a_known_tool_goes_out_as_content(text):
    tools = tool_set({"tools": [ADD]})
    content, deltas, _, called = streamed(text, tools)
    if parse(text, tools)[1]:  # a layout the scanner does not follow, still a valid call
        # arguments before the name: sent whole at the end, as the non-streamed call
        got, want = joined(deltas)[0], parse(text, tools)[1][0]["function"]
        assert content == "" and called and (got["name"], got["arguments"]) == tuple(want.values())
        return
    assert (content, deltas, called) == (text, [], False)


def test_a_call_cut_short_keeps_what_went_out_and_loses_nothing_after():
    tools = tool_set({"tools": [ADD]})
    cut = CALL[: CALL.index('"b"')]  # max_tokens ended it mid-arguments
    content, deltas, _, called = streamed(cut, tools)
    assert called and content == "" and joined(deltas)[0]["arguments"] == '{"a": 3, '
    broken = CALL.replace("}}]", "}} oops]") + " bye"  # the layout breaks after the arguments
    content, deltas, _, called = streamed(broken, tools)
    assert called and content == "oops]</tool_call> bye"
    plain = ToolStream(tools)
    assert plain.push("no call <tool") == ("no call ", [])  # a tail that may open a call waits


def test_call_deltas_join_to_the_call():
    tools = tool_set({"tools": [ADD]})
    _, calls = parse(CALL, tools)
    deltas = [d for group in call_deltas(calls, first=2) for d in group]
    assert deltas[0]["id"] == calls[0]["id"] and {d["index"] for d in deltas} == {2}
    assert "".join(d["function"]["arguments"] for d in deltas) == calls[0]["function"]["arguments"]
