"""Tool calling (``tools``, ``tool_choice``, ``parallel_tool_calls``) on a real server of
SmolLM2-135M-Instruct.

One in-process server for the module: forced calls (``required``, a named function) come back
as OpenAI ``tool_calls`` whose arguments parse and validate against the tool's schema; a stream
sends a call as it is generated (its header, then its arguments in pieces) and its deltas
accumulate (openai's stream helper) to exactly the non-streamed call; a conversation with past
calls and tool results is served; bad tools are 400s naming what is wrong; a LangChain agent runs two
tools end to end. The calls are forced where a 135M model could not be relied on to choose.
"""

from __future__ import annotations

import json
import time

import jsonschema
import pytest
import requests

pytestmark = pytest.mark.integration  # a real server in a thread

PAIR = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}


def function(name: str, description: str, parameters: dict = PAIR) -> dict:
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


TOOLS = [
    function("add", "Add two integers"),
    function("multiply", "Multiply two integers"),
    function(
        "weather",
        "The weather in a city",
        {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    ),
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is 3 plus 4?"}]


def checked(call) -> dict:
    """A call's arguments, parsed and validated against its tool's schema."""
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


@pytest.mark.parametrize(
    "choice, temperature",
    [
        ("required", 0.0),
        ({"type": "function", "function": {"name": "multiply"}}, 0.0),
        ({"type": "function", "function": {"name": "weather"}}, 0.9),
    ],
)
def test_forced_calls_parse_and_follow_the_schema(smol_client, choice, temperature):
    reply = smol_client.chat.completions.create(
        model="smol",
        messages=ASK,
        tools=TOOLS,
        tool_choice=choice,
        parallel_tool_calls=False,
        temperature=temperature,
        seed=5,
        max_tokens=60,
    )
    message, finish = reply.choices[0].message, reply.choices[0].finish_reason
    assert finish == "tool_calls" and message.content is None
    assert len(message.tool_calls) == 1  # parallel_tool_calls false: one call
    checked(message.tool_calls[0])
    if isinstance(choice, dict):
        assert message.tool_calls[0].function.name == choice["function"]["name"]


def test_a_streamed_call_arrives_as_generated_and_equals_the_whole_one(smol_client):
    settings = dict(
        model="smol",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=60,
        logprobs=True,  # a chunk carries the logprobs of the tokens it sends: when they came
    )
    whole = smol_client.chat.completions.create(**settings).choices[0]
    arrivals = []  # (seconds, chunk's tool_calls or None, finish_reason)
    fragment_tokens = []  # per argument fragment: how many tokens' logprobs came with it
    with smol_client.chat.completions.stream(**settings) as stream:
        for event in stream:
            if event.type == "chunk" and event.chunk.choices:
                choice = event.chunk.choices[0]
                arrivals.append(
                    (time.perf_counter(), choice.delta.tool_calls, choice.finish_reason)
                )
                if choice.delta.tool_calls and choice.delta.tool_calls[0].function.arguments:
                    entries = choice.logprobs.content if choice.logprobs else None
                    fragment_tokens.append(len(entries or []))
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == whole.finish_reason == "tool_calls"
    calls = [(t, d) for t, deltas, _ in arrivals if deltas for d in deltas]
    fragments = [d.function.arguments for _, d in calls if d.function.arguments]
    assert calls[0][1].id and calls[0][1].function.name  # the header comes first
    # the arguments came in pieces, each as its tokens were generated (at the end, they would
    # come in one burst, every token's logprobs on the first chunk)
    assert len(fragments) >= 2 and sum(n > 0 for n in fragment_tokens) >= 2
    finished = next(t for t, _, reason in arrivals if reason)
    assert calls[0][0] < finished  # the call began before the choice ended
    pairs = zip(streamed.message.tool_calls, whole.message.tool_calls, strict=True)
    for got, want in pairs:  # the openai client's accumulated call is the non-streamed one
        assert (got.function.name, got.function.arguments) == (
            want.function.name,
            want.function.arguments,
        )
        checked(got)
    assert "".join(fragments) == whole.message.tool_calls[0].function.arguments


def test_a_tool_result_round_trip(smol_client, smol_server):
    first = smol_client.chat.completions.create(
        model="smol",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=60,
    )
    call = first.choices[0].message.tool_calls[0]
    result = str(sum(checked(call).values()))
    history = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),  # as clients send it back
        {"role": "tool", "tool_call_id": call.id, "content": f"RESULT={result}"},
    ]
    answer = smol_client.chat.completions.create(
        model="smol",
        messages=history,
        tools=TOOLS,
        tool_choice="none",
        temperature=0,
        max_tokens=20,
    )
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None
    # the prompt the model saw holds the past call and the tool's result
    shown = requests.post(
        smol_server.url + "/tokenize",
        json={"model": "smol", "messages": history, "return_token_strs": True},
        timeout=30,
    ).json()
    text = "".join(shown["token_strs"]).replace("Ġ", " ")
    assert "RESULT=" + result in text and "<tool_call>" in text


@pytest.mark.parametrize(
    "change, named",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "divide"}}}, "divide"),
        ({"tools": [function("add", "x"), function("add", "y")]}, "twice"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [function("bad name!", "x")]}, "tools[0].function.name"),
        ({"tools": [function("f", "x", {"type": "object", "not": {}})]}, "not"),
        ({"tools": [function("f", "x", {"type": "objekt"})]}, "objekt"),
        ({"tool_choice": "sometimes"}, "sometimes"),
        ({"tools": None, "tool_choice": "required"}, "tools"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}, "messages"),
    ],
)
def test_bad_tools_are_400s_naming_what_is_wrong(smol_server, change, named):
    body = {"model": "smol", "messages": ASK, "tools": TOOLS, "tool_choice": "required"}
    response = requests.post(
        smol_server.url + "/v1/chat/completions", json={**body, **change}, timeout=30
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert named in error["message"] + str(error["param"])


def test_a_langchain_agent_runs_two_tools(smol_server):
    from langchain.agents import create_agent
    from langchain.agents.middleware import wrap_model_call
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    ran = []

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        ran.append(("add", a, b))
        return a + b

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        ran.append(("multiply", a, b))
        return a * b

    plan = ["add", "multiply", "none"]  # a 135M model is steered; the agent loop is real

    @wrap_model_call
    def steer(request, handler):
        step = sum(isinstance(m, AIMessage) for m in request.messages)
        choice = plan[min(step, len(plan) - 1)]
        forced = choice if choice == "none" else {"type": "function", "function": {"name": choice}}
        return handler(request.override(tool_choice=forced))

    model = ChatOpenAI(
        model="smol",
        base_url=smol_server.url + "/v1",
        api_key="x",
        temperature=0,
        max_tokens=40,
        max_retries=0,
        timeout=60,
    )
    agent = create_agent(model, tools=[add, multiply], middleware=[steer])
    state = agent.invoke(
        {"messages": [{"role": "user", "content": "Add 2 and 3, then multiply the sum by 4."}]},
        {"recursion_limit": 8},
    )
    calls = [c for m in state["messages"] if isinstance(m, AIMessage) for c in m.tool_calls]
    assert [c["name"] for c in calls] == ["add", "multiply"]
    assert all(isinstance(v, int) for c in calls for v in c["args"].values())
    assert [r[0] for r in ran] == ["add", "multiply"]  # the tools really ran, on those args
    results = [m for m in state["messages"] if isinstance(m, ToolMessage)]
    assert [m.tool_call_id for m in results] == [c["id"] for c in calls]
    last = state["messages"][-1]
    assert isinstance(last, AIMessage) and not last.tool_calls
