"""Policy text -> data: every refusal is one located `InvalidInputError`, never a traceback; the limits hold
before (size, JSON depth) and while (YAML depth, aliases) the text is parsed."""

from __future__ import annotations

import pytest

from hyperfence.errors import InvalidInputError
from hyperfence.policy import document
from hyperfence.policy.document import MAX_ALIAS_NODES, MAX_POLICY_BYTES, MAX_POLICY_DEPTH, load_document

DEPTH = "more than 32 nested lists or mappings (expected at most 32; a policy needs 5)"


def refusal(text: str | bytes) -> tuple[str, list[str]]:
    """The first line of the error and its problems."""
    with pytest.raises(InvalidInputError) as e:
        load_document(text, source="p.yaml")
    return str(e.value).split("\n")[0], [str(p) for p in e.value.problems]


def test_the_limits_are_what_the_docs_say() -> None:
    assert (MAX_POLICY_BYTES, MAX_POLICY_DEPTH, MAX_ALIAS_NODES) == (64 * 2**20, 32, 1_000_000)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        # the 33rd level: the mapping around the document is the first
        ('{"networks": ' + "[" * 100_000 + "]" * 100_000 + "}", "line 1 column 45"),
        ('{"a": ' * 100_000 + "1" + "}" * 100_000, "line 1 column 193"),
        ('{"networks": ' + "[" * 40 + "]" * 40 + "}", "line 1 column 45"),  # parses, then measured
        ("networks: " + "[" * 100_000 + "]" * 100_000, "line 1 column 42"),
        ("networks: " + "{a: " * 100_000 + "1" + "}" * 100_000, "line 1 column 135"),
        ("networks:\n" + "".join("  " * i + "-\n" for i in range(1, 3000)), "line 33 column 65"),
    ],
    ids=["json-lists", "json-maps", "json-41", "yaml-flow-lists", "yaml-flow-maps", "yaml-block"],
)
def test_deep_nesting_is_refused_where_it_passes_the_limit(text: str, where: str) -> None:
    assert refusal(text) == ("p.yaml is nested too deeply", [f"{where}: {DEPTH}"])


@pytest.mark.parametrize("flavour", ["json", "yaml"])
def test_nesting_up_to_the_limit_is_read(flavour: str) -> None:
    inner = "[" * (MAX_POLICY_DEPTH - 1) + "]" * (MAX_POLICY_DEPTH - 1)
    text = f'{{"a": {inner}}}' if flavour == "json" else f"a: {inner}"
    data = load_document(text)
    for _ in range(MAX_POLICY_DEPTH - 2):
        (data,) = data["a"] if isinstance(data, dict) else data
    assert data == []
    over = "[" * MAX_POLICY_DEPTH + "]" * MAX_POLICY_DEPTH
    assert (
        refusal(f'{{"a": {over}}}' if flavour == "json" else f"a: {over}")[0] == "p.yaml is nested too deeply"
    )


def test_brackets_inside_json_strings_do_not_count() -> None:
    assert load_document('{"a": "' + "[" * 100 + '\\"[[[", "b": [[1]]}') == {
        "a": "[" * 100 + '"[[[',
        "b": [[1]],
    }
    # where a deep document is refused: strings (escaped quotes too) are skipped, the 33rd level is found
    text = '{"a": "\\"' + "[" * 50 + '", "b": ' + "[" * 40 + "]" * 40 + "}"
    assert refusal(text) == ("p.yaml is nested too deeply", [f"line 1 column 99: {DEPTH}"])


def test_a_document_over_the_size_limit_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(document, "MAX_POLICY_BYTES", 100)
    head = "p.yaml is larger than 0 MiB (100 bytes), the most a policy may be"
    assert refusal(b"a: " + b"x" * 98)[0].startswith(head)  # 101 bytes
    assert refusal("a: " + "é" * 49)[0].startswith(head)  # 52 characters, 101 bytes
    assert load_document(b"a: " + b"x" * 97) == {"a": "x" * 97}


def test_alias_bombs_and_recursive_aliases_are_refused_where_they_are() -> None:
    lines = ["a0: &a0 [" + ",".join(["x"] * 10) + "]"]
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    assert refusal("\n".join(lines)) == (
        "p.yaml is too large once its aliases are expanded",
        [
            # a0..a4 stand for 123,440 values; a5 adds 111,111 per alias: its 8th passes 1,000,000
            "line 6 column 38: aliases stand for more than 1,000,000 values (expected fewer: write the values "
            "out, or use fewer aliases of aliases)"
        ],
    )
    assert refusal("a: &x [1, *x]") == (
        "p.yaml is not a policy",
        ["line 1 column 11: alias *x is inside its own anchor &x (expected no recursive aliases)"],
    )


def test_ordinary_aliases_are_read() -> None:
    data = load_document("web: &web [vm:a, vm:b]\nrules: [{from: *web, to: *web}]")
    assert data["rules"] == [{"from": ["vm:a", "vm:b"], "to": ["vm:a", "vm:b"]}]


def test_text_that_is_not_utf8_or_not_allowed_in_yaml_is_located() -> None:
    assert refusal(b"networks: []\nname: \xff\xfe") == (
        "p.yaml is not UTF-8 text",
        ["line 2 column 7: byte 0xff is not UTF-8 (expected text)"],
    )
    assert refusal("a: 1\nb: '\x00'") == (
        "p.yaml is not valid YAML",
        ["line 2 column 5: character U+0000 is not allowed in YAML text"],
    )
    assert load_document(b"\xef\xbb\xbf{}") == {}  # a UTF-8 byte order mark is fine


def test_yaml_does_not_turn_macs_and_ports_into_base_60_numbers() -> None:
    data = load_document("mac: 52:54:00:00:00:02\nport: 22:80\nt: 1:30.5\nn: 0x10\nf: 1.5\ni: 42")
    assert data == {"mac": "52:54:00:00:00:02", "port": "22:80", "t": "1:30.5", "n": 16, "f": 1.5, "i": 42}


def test_a_yaml_flow_mapping_is_yaml_and_broken_json_is_a_json_error() -> None:
    assert load_document("{networks: [a]}") == {"networks": ["a"]}
    assert refusal('{"networks": [}') == ("p.yaml is not valid JSON", ["line 1 column 15: Expecting value"])


def test_yaml_syntax_errors_are_located() -> None:
    assert refusal("networks: [\n  {name: lab\n") == (
        "p.yaml is not valid YAML",
        ["line 3 column 1: expected ',' or '}', but got '<stream end>'"],
    )
