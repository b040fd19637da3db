"""Prompt construction: math prompts with worked examples, function-call prompts with a Hermes `<tools>` block.

Math: every prompt asks for the final answer in ``\\boxed{}``. Worked examples go in as earlier user/assistant turns,
so the chat template renders them exactly like a real exchange and the model sees the answer format it must
produce. Each worked answer is one line that ends in ``\\boxed{N}``: a small model copies the shape of the example,
and a long derivation in the example teaches it to ramble past the token budget.

Function calling: the function docs go in the system message in the Hermes / Qwen convention (a ``<tools>`` block of
JSON schemas, calls answered as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``), which is the format
that Qwen-family chat templates produce when given ``tools=``. Rendering the block ourselves keeps the prompt the
same whatever chat template the tokenizer has.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

Message = dict[str, str]

MATH_INSTRUCTION = "Put your final answer within \\boxed{}."
"""Appended to every math question (examples included), so the verifier's \\boxed{} extraction applies."""

TOOLS_PREAMBLE = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML "
    "tags. You may call one or more functions to assist with the user query. Don't make assumptions about what "
    "values to plug into functions. If none of the functions can be used, say so and make no call."
)
TOOL_CALL_FORMAT = (
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)

# BFCL writes types in a loose vocabulary (dict, float, tuple, Java and JavaScript names); models are trained on
# JSON Schema, so the prompt shows JSON Schema types. The raw docs stay in DataItem.tools for the verifier.
_JSON_SCHEMA_TYPES = {
    "integer": "integer",
    "number": "number",
    "float": "number",
    "double": "number",
    "string": "string",
    "String": "string",
    "char": "string",
    "boolean": "boolean",
    "Boolean": "boolean",
    "bool": "boolean",
    "array": "array",
    "list": "array",
    "tuple": "array",
    "ArrayList": "array",
    "Array": "array",
    "Queue": "array",
    "Stack": "array",
    "dict": "object",
    "object": "object",
    "HashMap": "object",
    "Hashtable": "object",
    "byte": "integer",
    "short": "integer",
    "long": "integer",
    "Bigint": "integer",
}

_LANGUAGE_HINTS = {
    "python": " Note that the provided function is in Python 3 syntax.",
    "java": " Note that the provided function is in Java 8 SDK syntax.",
    "javascript": " Note that the provided function is in JavaScript syntax.",
}


def math_user_message(question: str) -> str:
    """The user turn of one math question: the question, then the \\boxed{} instruction."""
    return f"{question.strip()}\n\n{MATH_INSTRUCTION}"


def worked_answer(answer: str, expression: str | None = None) -> str:
    """A short worked answer that ends in \\boxed{answer}; shows the expression when the generator gives one."""
    boxed = f"\\boxed{{{answer}}}"
    if expression:
        return f"{expression} = {answer}, so the final answer is {boxed}"
    return f"The final answer is {boxed}"


def build_math_messages(
    question: str,
    examples: Sequence[tuple[str, str]] = (),
    system_prompt: str | None = None,
) -> list[Message]:
    """Chat turns of a math prompt: optional system, one user/assistant pair per (question, worked answer) example,
    then the question itself."""
    messages: list[Message] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    for example_question, example_answer in examples:
        messages.append({"role": "user", "content": math_user_message(example_question)})
        messages.append({"role": "assistant", "content": example_answer})
    messages.append({"role": "user", "content": math_user_message(question)})
    return messages


def _schema_type(raw: Any) -> str:
    return _JSON_SCHEMA_TYPES.get(raw, "string") if isinstance(raw, str) else "string"


def _to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """Rewrite BFCL's types into JSON Schema types, recursively through properties and items."""
    out = dict(node)
    out["type"] = _schema_type(node.get("type"))
    if isinstance(node.get("properties"), dict):
        out["properties"] = {k: _to_json_schema(v) for k, v in node["properties"].items() if isinstance(v, dict)}
    if isinstance(node.get("items"), dict):
        out["items"] = _to_json_schema(node["items"])
    return out


def _stringly_typed(function: dict[str, Any], language: str) -> dict[str, Any]:
    """BFCL's Java/JavaScript convention: every argument is passed as a string in that language's syntax."""
    params = function.get("parameters", {})
    for value in params.get("properties", {}).values():
        kind = value.get("type", "any")
        value["description"] = value.get("description", "") + (
            f" This parameter can be of any type of {language} object in string representation."
            if kind == "any"
            else f" This is {language} {kind} type parameter in string representation."
        )
        value["type"] = "string"
        value.pop("items", None)
        value.pop("properties", None)
    return function


def function_schema(function: dict[str, Any], language: str | None = None) -> dict[str, Any]:
    """One function doc as the prompt shows it: JSON Schema types plus BFCL's language hint when given."""
    doc = copy.deepcopy(function)
    if language is not None:
        doc["description"] = doc.get("description", "") + _LANGUAGE_HINTS[language]
        if language in ("java", "javascript"):
            doc = _stringly_typed(doc, "Java" if language == "java" else "JavaScript")
    if isinstance(doc.get("parameters"), dict):
        doc["parameters"] = _to_json_schema(doc["parameters"])
    return {"type": "function", "function": doc}


def tools_system_prompt(
    tools: Sequence[dict[str, Any]], system_prompt: str | None = None, language: str | None = None
) -> str:
    """The system message of a function-call prompt: optional instructions, the <tools> block, the call format."""
    lines = [json.dumps(function_schema(tool, language), ensure_ascii=False) for tool in tools]
    parts = [system_prompt.strip()] if system_prompt else []
    parts.append(f"{TOOLS_PREAMBLE}\n<tools>\n" + "\n".join(lines) + "\n</tools>")
    parts.append(TOOL_CALL_FORMAT)
    return "\n\n".join(parts)


def build_function_call_messages(
    turns: Sequence[Message],
    tools: Sequence[dict[str, Any]],
    system_prompt: str | None = None,
    language: str | None = None,
) -> list[Message]:
    """Chat turns of a function-call prompt: the tools system message (merged with any leading system turns of the
    item and the configured system prompt), then the remaining turns unchanged."""
    leading = 0
    while leading < len(turns) and turns[leading]["role"] == "system":
        leading += 1
    instructions = [text for text in [system_prompt, *(t["content"] for t in turns[:leading])] if text]
    system = tools_system_prompt(tools, "\n\n".join(instructions) or None, language)
    return [{"role": "system", "content": system}, *(dict(t) for t in turns[leading:])]
