"""Function tools as the TypeScript-like `namespace functions` text of the developer message (§5.4).

The text reproduces openai-harmony's renderer quirk for quirk (an object's description printed
twice, closing braces indented like the properties, enum defaults unquoted, serde_json number
formatting) because gpt-oss was trained on exactly that text.
"""

import json
import math
import re
from decimal import Decimal
from typing import Any, NamedTuple

INDENT = "    "  # one level of object nesting
ONE_OF_INDENT = "   "  # what a oneOf variant adds to the indentation


class FunctionTool(NamedTuple):
    name: str
    description: str
    parameters: dict | None  # JSON schema; None renders `() => any`


def functions_section(tools: list[FunctionTool]) -> str:
    """The `# Tools` section holding the `functions` namespace."""
    lines = ["## functions\n", "namespace functions {\n"]
    for tool in tools:
        lines += [f"// {line}" for line in rust_lines(tool.description)]
        if tool.parameters is None:
            lines.append(f"type {tool.name} = () => any;\n")
            continue
        try:
            params = schema_to_ts(tool.parameters)
        except ValueError as e:
            raise ValueError(f"tool {tool.name!r}: {e}") from None
        lines.append(f"type {tool.name} = (_: {params}) => any;\n")
    lines.append("} // namespace functions")
    return "# Tools\n\n" + "\n".join(lines)


def rust_lines(text: str) -> list[str]:
    """Rust's `str::lines`: split on \\n, drop one trailing \\r per line and a final empty line."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def schema_to_ts(schema: Any, indent: str = "") -> str:
    """One JSON schema as a TypeScript type; unknown shapes become `any`, never an error."""
    one_of = _get(schema, "oneOf")
    if isinstance(one_of, list):
        return "".join(f"\n{indent} | {_variant(v, indent, True, False)}" for v in one_of)
    kind = _get(schema, "type")
    if isinstance(kind, list):
        names = ["number" if k == "integer" else k for k in kind if isinstance(k, str)]
        if names:
            return " | ".join(names)
    if kind == "object":
        return _object(schema, indent)
    if kind == "string":
        enum = _get(schema, "enum")
        values = [f'"{v}"' for v in enum if isinstance(v, str)] if isinstance(enum, list) else []
        return " | ".join(values) or "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        return schema_to_ts(schema["items"], indent) + "[]" if "items" in schema else "Array<any>"
    return "any"


def _object(schema: dict, indent: str) -> str:
    desc = schema.get("description")
    out = f"{indent}// {desc}\n" if isinstance(desc, str) else ""
    out += "{\n"
    props = schema.get("properties")
    if isinstance(props, dict):
        req = schema.get("required")
        required = {r for r in req if isinstance(r, str)} if isinstance(req, list) else set()
        for key, prop in props.items():
            out += _property(key, prop, key in required, indent)
    return out + f"{indent}}}"


def _property(key: str, prop: Any, required: bool, indent: str) -> str:
    mark = "" if required else "?"
    out = ""
    if isinstance(title := _get(prop, "title"), str):
        out += f"{indent}// {title}\n{indent}//\n"
    has_one_of = isinstance(prop, dict) and "oneOf" in prop
    if not has_one_of and isinstance(desc := _get(prop, "description"), str):
        out += f"{indent}// {desc}\n"
    examples = _get(prop, "examples")
    if isinstance(examples, list) and examples:
        out += f"{indent}// Examples:\n"
        out += "".join(f'{indent}// - "{ex}"\n' for ex in examples if isinstance(ex, str))
    if isinstance(one_of := _get(prop, "oneOf"), list):
        return out + _one_of_property(key, mark, prop, one_of, indent)
    out += f"{indent}{key}{mark}: {_nullable(prop, schema_to_ts(prop, indent + INDENT))},"
    if not has_one_of and isinstance(prop, dict) and "default" in prop:
        out += f" // {_default(prop, enum_raw=True)}"
    return out + "\n"


def _one_of_property(key: str, mark: str, prop: dict, one_of: list, indent: str) -> str:
    """`key?:` then one ` | variant // comment` line per variant, then a lone `,` line."""
    desc = prop.get("description")
    desc = desc if isinstance(desc, str) else None
    # The property's description goes above unless the first variant repeats it.
    above = desc is not None and not (one_of and _get(one_of[0], "description") == desc)
    out = f"{indent}// {desc}\n" if above else ""
    if "default" in prop:
        out += f"{indent}// {_default(prop, enum_raw=True)}\n"
    out += f"{indent}{key}{mark}:\n"
    for i, variant in enumerate(one_of):
        show_desc = not (i == 0 and above) and _get(variant, "description") != desc
        out += f"{indent} | {_variant(variant, indent, show_desc, True)}\n"
    return out + f"{indent},\n"


def _variant(variant: Any, indent: str, show_desc: bool, enum_raw: bool) -> str:
    text = _nullable(variant, schema_to_ts(variant, indent + ONE_OF_INDENT))
    comments = []
    if show_desc and isinstance(desc := _get(variant, "description"), str):
        comments.append(desc)
    if isinstance(variant, dict) and "default" in variant:
        comments.append(_default(variant, enum_raw))
    return text + (f" // {' '.join(comments)}" if comments else "")


def _nullable(schema: Any, text: str) -> str:
    return f"{text} | null" if _get(schema, "nullable") is True and "null" not in text else text


def _default(schema: dict, enum_raw: bool) -> str:
    """Strings are quoted unescaped; an enum's string default is bare (or JSON, in a bare oneOf)."""
    value = schema["default"]
    enum = schema.get("enum")
    if isinstance(value, str) and not (isinstance(enum, list) and enum):
        return f'default: "{value}"'
    if isinstance(value, str) and enum_raw:
        return f"default: {value}"
    return f"default: {to_json(value)}"


def _get(schema: Any, key: str) -> Any:
    return schema.get(key) if isinstance(schema, dict) else None


def to_json(value: Any) -> str:
    """Compact JSON as harmony prints it: Python's JSON text re-read and printed by serde_json."""
    if value is None or isinstance(value, bool | str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int) and -(2**63) <= value < 2**64:
        return str(value)
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"default value {value} is not JSON")
        return _ryu(_serde_f64(json.dumps(value)))
    if isinstance(value, list | tuple):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{to_json(str(k))}:{to_json(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"default value {value!r} is not JSON")


def _serde_f64(literal: str) -> float:
    """The f64 serde_json (without `float_roundtrip`) reads from a JSON number: the leading digits
    that fit a u64 (integer digits past that count as powers of ten, fraction digits are dropped),
    then one multiply or divide by a power of ten. Not always the nearest float."""
    match = re.fullmatch(r"(-?)(\d+)(?:\.(\d+))?(?:[eE]([+-]?\d+))?", literal)
    assert match is not None, literal
    sign, whole, fraction, exp = match.groups()
    significand, exponent, overflow = 0, int(exp or 0), False
    for digit in map(int, whole):
        if overflow or significand * 10 + digit >= 2**64:
            overflow, exponent = True, exponent + 1
        else:
            significand = significand * 10 + digit
    for digit in map(int, fraction or ""):
        if significand * 10 + digit >= 2**64:
            break
        significand, exponent = significand * 10 + digit, exponent - 1
    f = float(significand)
    while abs(exponent) > 308:  # past the table of powers of ten
        if f == 0.0:
            break
        if exponent > 0:
            raise ValueError("a numeric default is out of range")
        f, exponent = f / 1e308, exponent + 308
    else:
        f = f * float(10**exponent) if exponent >= 0 else f / float(10**-exponent)
    if math.isinf(f):
        raise ValueError("a numeric default is out of range")
    return -f if sign else f


def _ryu(x: float) -> str:
    """A float with the shortest round-trip digits, laid out like Rust's `ryu` crate."""
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    sign, digit_tuple, exp = Decimal(repr(x)).as_tuple()
    assert isinstance(exp, int)
    digits = "".join(map(str, digit_tuple))
    exp += len(digits) - len(digits.rstrip("0"))
    digits = digits.rstrip("0")
    point = len(digits) + exp  # x = 0.DIGITS * 10**point
    out = "-" if sign else ""
    if exp >= 0 and point <= 16:
        return out + digits + "0" * exp + ".0"
    if 0 < point <= 16:
        return out + digits[:point] + "." + digits[point:]
    if -5 < point <= 0:
        return out + "0." + "0" * -point + digits
    mantissa = digits if len(digits) == 1 else digits[0] + "." + digits[1:]
    return f"{out}{mantissa}e{point - 1}"
