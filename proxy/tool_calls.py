"""Tool calling, made alike on both paths.

What vLLM 0.32 does with a chat request's `tool_choice` depends on how it was started:
- without a tool-call parser it refuses "auto", "required" and a named function with a 400 (tools with
  "none", or with an explicit null choice, are only rendered into the prompt);
- with `--enable-auto-tool-choice --tool-call-parser P`, where P reads forced calls as JSON (most parsers
  without a structural tag of their own), "required" and a named function constrain the output to a JSON
  schema built from the tools and read the calls back from that JSON; "auto" leaves the output free and
  reads calls in P's own format.

A flagged chat goes to /v1/completions, where no parser runs. So the proxy learns once what the backend
does (`probe`), decides before the gate what a request may ask (`tool_choice_refusal`: the same answer
whatever the verdict), and for a forced call on the flagged path sends the same schema as
`structured_outputs` and reads the calls back the same way (`ForcedToolCalls`), whole or streamed. "auto"
with a parser is refused: P's format cannot be read back without P.
"""
from __future__ import annotations

import copy
import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from proxy.protocol import ChatCompletionRequest, NamedToolChoice
from vllm_client import AsyncVllmClient, BackendUnavailable

# unavailable: vLLM refuses forced and automatic tool choices; json: forced calls are JSON-constrained;
# other: forced calls come back some other way, which the proxy cannot reproduce.
BackendToolCalls = Literal["unavailable", "json", "other"]

_PROBE_TOOL = "eco_probe"
_NO_PARSER_HINT = "--tool-call-parser"
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}  # a function without parameters still takes an object


async def probe(upstream: AsyncVllmClient, model: str) -> BackendToolCalls:
    """Ask the backend for one forced call of a tool without parameters, one token long: a parser that reads
    forced calls as JSON answers with that call (its arguments begin the object), a vLLM without a parser
    refuses. BackendUnavailable when the backend cannot say now."""
    tool = {"type": "function", "function": {"name": _PROBE_TOOL, "parameters": _EMPTY_PARAMETERS}}
    reply = await upstream.request_json("POST", "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "Call the tool."}], "tools": [tool],
        "tool_choice": {"type": "function", "function": {"name": _PROBE_TOOL}}, "max_tokens": 1, "temperature": 0})
    if reply.status >= 500:
        raise BackendUnavailable("the model backend failed to answer")
    body = reply.body if isinstance(reply.body, dict) else {}
    if reply.status != 200:
        message = str((body.get("error") or {}).get("message", ""))
        return "unavailable" if _NO_PARSER_HINT in message else "other"
    try:
        [call] = body["choices"][0]["message"]["tool_calls"]
        answered = call["function"]["name"] == _PROBE_TOOL and call["function"]["arguments"].startswith("{")
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        answered = False
    return "json" if answered else "other"


def tool_choice_refusal(request: ChatCompletionRequest, backend: BackendToolCalls) -> tuple[str, str | None] | None:
    """The 400 (message, param) a chat request gets on both paths for the tool choice it makes, given what the
    backend does; None when it may go on. vLLM's own words where vLLM itself would refuse."""
    if not request.tools:
        return None
    choice = request.tool_choice
    chose = "tool_choice" in request.model_fields_set  # vLLM takes tools without a choice as "auto"
    if backend == "unavailable":
        if choice == "auto" or not chose:
            return "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set", None
        if choice == "required":
            return "tool_choice=\"required\" requires --tool-call-parser to be set", None
        if isinstance(choice, NamedToolChoice):
            return f"tool_choice=function \"{choice.function.name}\" requires --tool-call-parser to be set", None
        return None
    if choice == "auto" or choice is None:  # with a parser, an explicit null is read as "auto" too
        return ("\"auto\" tool choice is not available through this proxy; send \"required\", a named function "
                "or \"none\""), "tool_choice"
    if choice == "none":
        return None
    if backend == "other":
        return "forced tool calls are not available through this proxy with this backend", "tool_choice"
    try:
        ForcedToolCalls.of(request)
    except ToolSchemaError as exc:
        return str(exc), "tools"
    return None


class ToolSchemaError(ValueError):
    """The tools cannot be made into one schema (vLLM refuses them alike)."""


class _ArrayCall(BaseModel):
    """One element of a "required" answer, as vLLM validates it (other keys are allowed)."""

    model_config = ConfigDict(extra="allow")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


_ARRAY_CALLS = TypeAdapter(list[_ArrayCall])


def new_call_id() -> str:
    return f"chatcmpl-tool-{secrets.token_hex(8)}"


@dataclass(frozen=True)
class ForcedToolCalls:
    """A forced tool choice: the schema the output is held to, and how calls are read back from it.
    `function` is the named function, or None for "required" (an array of calls of any of the tools)."""

    schema: dict[str, Any]
    function: str | None
    single: bool  # parallel_tool_calls false: the first call only

    @classmethod
    def of(cls, request: ChatCompletionRequest) -> ForcedToolCalls | None:
        """None unless the request forces a call; ToolSchemaError for tools vLLM refuses to combine."""
        tools = request.tools or []
        single = request.parallel_tool_calls is False
        if isinstance(request.tool_choice, NamedToolChoice):
            name = request.tool_choice.function.name
            parameters = next(t.function.parameters for t in tools if t.function.name == name)
            return cls(parameters or _EMPTY_PARAMETERS, name, single)
        if request.tool_choice != "required":
            return None
        choices, definitions = [], {}
        for tool in tools:
            parameters = copy.deepcopy(tool.function.parameters)
            # Shared definitions move to the top of the schema, where references find them.
            shared = (parameters or {}).pop("$defs", {})
            if not isinstance(shared, dict):
                raise ToolSchemaError(f"`$defs` in the parameters of tool '{tool.function.name}' must be an object")
            for key, definition in shared.items():
                if definitions.setdefault(key, definition) != definition:
                    raise ToolSchemaError(f"tool definition '{key}' has multiple schemas, which is not supported")
            choices.append({"properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                           "parameters": parameters or _EMPTY_PARAMETERS},
                            "required": ["name", "parameters"]})
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": choices}}
        if single:
            schema["maxItems"] = 1
        if definitions:
            schema["$defs"] = definitions
        return cls(schema, None, single)

    def calls(self, text: str) -> list[dict[str, Any]]:
        """The `tool_calls` of a whole answer: a named call holds the text as its arguments (unless blank);
        "required" reads the JSON array, and an array that does not validate gives no calls."""
        if self.function is not None:
            found = [(self.function, text)] if text.strip() else []
        else:
            try:
                parsed = _ARRAY_CALLS.validate_json(text)
            except ValidationError:
                parsed = []
            found = [(call.name, json.dumps(call.parameters, ensure_ascii=False)) for call in parsed]
        calls = [{"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
                 for name, arguments in found]
        return calls[:1] if self.single else calls

    def finish_reason(self, finish: str | None, called: bool) -> str | None:
        """OpenAI's rule as vLLM applies it: "tool_calls" when a "required" answer stops (streamed: once a
        call was sent); a named call keeps the model's reason."""
        return "tool_calls" if self.function is None and finish == "stop" and called else finish

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)


@dataclass
class _Element:
    """Where one call of a "required" array stands: its name once its string closed, and the span of its
    parameters value (end None while it is being generated). Offsets never change as text is added."""

    name: str | None = None
    name_end: int | None = None
    arguments_start: int | None = None
    arguments_end: int | None = None

    def ready_at(self, length: int) -> bool:
        """Whether the first `length` characters showed a complete name and the start of the parameters."""
        return (self.name is not None and self.name_end is not None and self.name_end <= length
                and self.arguments_start is not None and self.arguments_start < length)


@dataclass
class _ArrayScanner:
    """Reads a "required" answer character by character, recording each element's `_Element`. Only the
    elements' own keys are interpreted: strings and nesting below them are only followed."""

    elements: list[_Element] = field(default_factory=list)
    text: str = ""
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    done: bool = False  # the array closed, or the text is not an array of objects
    expect: str = "key"  # key | colon | value | string | container | scalar | after
    key: str | None = None
    token_start: int = 0

    def feed(self, delta: str) -> None:
        start = len(self.text)
        self.text += delta
        for position in range(start, len(self.text)):
            if self.done:
                return
            self._read(position, self.text[position])

    def _read(self, position: int, char: str) -> None:
        current = self.elements[-1] if self.depth >= 2 and self.elements else None
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
                if self.depth == 2 and self.expect == "key":
                    self.key, self.expect = self.text[self.token_start + 1:position], "colon"
                elif self.depth == 2 and self.expect == "string":
                    self._value_ends(current, position + 1)
            return
        if char == '"':
            self.in_string, self.token_start = True, position
            if self.depth == 2 and self.expect == "value":
                self._value_starts(current, position, "string")
        elif char in "{[":
            if (self.depth == 0 and char != "[") or (self.depth == 1 and char != "{"):
                self.done = True
                return
            if self.depth == 1:
                self.elements.append(_Element())
                self.expect, self.key = "key", None
            elif self.depth == 2 and self.expect == "value":
                self._value_starts(current, position, "container")
            self.depth += 1
        elif char in "}]":
            if self.depth == 2 and self.expect == "scalar":
                self._value_ends(current, position)
            self.depth -= 1
            if self.depth == 2 and self.expect == "container":
                self._value_ends(self.elements[-1], position + 1)
            elif self.depth <= 0:
                self.done = True
        elif self.depth == 2:
            if char == ":" and self.expect == "colon":
                self.expect = "value"
            elif char == ",":
                if self.expect == "scalar":
                    self._value_ends(current, position)
                self.expect, self.key = "key", None
            elif char.isspace():
                if self.expect == "scalar":
                    self._value_ends(current, position)
            elif self.expect == "value":
                self._value_starts(current, position, "scalar")

    def _value_starts(self, element: _Element | None, position: int, kind: str) -> None:
        self.token_start, self.expect = position, kind
        if element is not None and self.key == "parameters":
            element.arguments_start = position

    def _value_ends(self, element: _Element | None, end: int) -> None:
        if element is not None and self.key == "parameters":
            element.arguments_end = end
        elif element is not None and self.key == "name" and self.expect == "string":
            try:
                element.name, element.name_end = json.loads(self.text[self.token_start:end]), end
            except ValueError:
                element.name = None  # never a valid name: this call is never sent
        self.expect = "after"


class ToolCallStream:
    """One choice's forced call, streamed as vLLM streams it. A named call: the first delta carries the id,
    the name and the text so far as arguments, every later one the new text. "required": each call is
    announced (id, name, arguments so far) once its name is complete and its parameters have begun, then
    its parameters' new text follows; text outside the calls is never sent."""

    def __init__(self, forced: ForcedToolCalls):
        self.forced = forced
        self.called = False  # a call was announced
        self._scanner = _ArrayScanner()

    def feed(self, delta: str) -> list[dict[str, Any]] | None:
        """The tool-call deltas for this piece of output; None when it shows nothing new."""
        if self.forced.function is not None:
            deltas = [self._named(delta)]
        else:
            deltas = self._array(delta)
        if self.forced.single:
            deltas = [d for d in deltas if d["index"] == 0]
        return deltas or None

    def _named(self, delta: str) -> dict[str, Any]:
        if self.called:
            return {"index": 0, "function": {"arguments": delta}}
        self.called = True
        return {"id": new_call_id(), "type": "function", "index": 0,
                "function": {"name": self.forced.function, "arguments": delta}}

    def _array(self, delta: str) -> list[dict[str, Any]]:
        sent = len(self._scanner.text)
        self._scanner.feed(delta)
        text, deltas = self._scanner.text, []
        for index, element in enumerate(self._scanner.elements):
            if not element.ready_at(len(text)):
                break  # calls come in order: none after this one is ready either
            start = element.arguments_start
            end = element.arguments_end if element.arguments_end is not None else len(text)
            if element.ready_at(sent):
                if end > sent:
                    deltas.append({"index": index, "function": {"name": None, "arguments": text[max(start, sent):end]}})
                continue
            self.called = True
            deltas.append({"id": new_call_id(), "type": "function", "index": index,
                           "function": {"name": element.name, "arguments": text[start:end]}})
        return deltas
