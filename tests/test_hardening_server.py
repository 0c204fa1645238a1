"""Issue 14, the input boundary and the server: one text rule, bounded fetches and decodes, the server's
answers to hostile or malformed requests. The guard has random weights: plumbing, never quality."""

from __future__ import annotations

import pytest

from mmguard.conversation import Conversation, ConversationError, InvalidTextError, Turn, check_text
from mmguard.policy import DEFAULT_POLICY, PolicyError, load_policy

# -- defect 1: lone surrogates, one rule at the input boundary ------------------------------------------


def test_check_text_names_field_and_position() -> None:
    with pytest.raises(InvalidTextError) as info:
        check_text("abcd\ud800", "message 1 part 1")
    assert str(info.value) == (
        "message 1 part 1: text holds a lone surrogate (U+D800) at character 5; text must be valid Unicode"
    )
    # bytes that did not decode as UTF-8 (surrogateescape) are named as such
    with pytest.raises(InvalidTextError, match=r"undecodable byte 0xFF"):
        check_text(b"a\xff".decode("utf-8", "surrogateescape"), "prompt")
    valid = "ok \U0001f600 \u202e RTL \x00 NUL \u0007"
    assert check_text(valid, "x") is valid


@pytest.mark.parametrize(
    "build, where",
    [
        (lambda: Conversation.prompt("hi\ud800"), "prompt"),
        (lambda: Conversation.response("hi", "\udfffthere"), "response"),
        (lambda: Conversation.from_turns([("user", "a"), ("agent", "b\ud83d")]), "turn 2"),
        (lambda: Conversation.from_messages([{"role": "user", "content": "x\udc80"}]), "message 1"),
        (
            lambda: Conversation.from_messages(
                [{"role": "user", "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": "\ud800"}]}]
            ),
            "message 1 part 2",
        ),
        (lambda: Conversation((Turn("user", ("a", "b\ud800")),)), "turn 1 part 2"),
    ],
)
def test_every_conversation_constructor_rejects_surrogates(build, where: str) -> None:
    with pytest.raises(ConversationError, match=rf"^{where}: text holds a lone surrogate"):
        build()


@pytest.mark.parametrize(
    "build",
    [
        lambda: DEFAULT_POLICY.exclude(["S1", "\ud800"]),
        lambda: DEFAULT_POLICY.exclude([3]),  # type: ignore[list-item]
        lambda: load_policy({"name": "x\udc80", "categories": {"S1": "Crimes."}}),
        lambda: load_policy({"categories": {"S1": "Crimes\ud800."}}),
        lambda: load_policy({"categories": [{"code": "S1", "label": "a", "description": "\udfff"}]}),
        lambda: load_policy({"categories": [{"code": "S1", "label": "a", "\ud800": 1}]}),
        lambda: load_policy({"categories": {"S1": "a"}, "excluded": ["\ud800"]}),
        lambda: load_policy("no\x00such-file.yaml"),
    ],
)
def test_policy_text_is_checked(build) -> None:
    with pytest.raises(PolicyError) as info:
        build()
    str(info.value).encode("utf-8")  # the message itself is valid text (reprs escape what they echo)
