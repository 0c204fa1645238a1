"""What the rails judge, built from an OpenAI chat-completions request.

Llama Guard reads alternating ``User:`` / ``Agent:`` turns, at most one image, nothing else. From a request's
``messages``:

* roles read as the moderation server reads them (:func:`mmguard.server.inputs.message_role`: ``human`` is the
  user, ``agent`` the assistant, any case); a role it does not know is refused (400), never skipped;
* ``system`` / ``developer`` messages are dropped (instructions to the model, not conversation);
* ``tool`` / ``function`` / ``ipython`` messages (tool results) are dropped, and so are assistant messages without
  text (tool calls only); the text of other assistant messages is kept (``refusal`` parts are dropped);
* a dropped message that holds an image, audio or a file is refused (400 ``unjudgeable_content``): the upstream
  would see what the guard never did;
* consecutive messages of one role are merged, and a conversation that starts with the assistant is read
  as starting with the user (llama-stack's rule, shared with ``/v1/safety/run-shield``);
* everything after the last user message is cut: the **input rail** judges the conversation ending with
  that user turn (prompt classification, with the image);
* the **output rail** judges that conversation plus what the answer says as the agent turn (response
  classification, with the user's image): its ``content`` (a string or the text of its parts), its ``refusal``,
  an audio answer's transcript and its citations (:func:`mmguard.proxy.answers.said_text`); tool calls are
  not judged, reasoning only
  with ``judge_reasoning``;
* only the last ``MAX_TURNS - 1`` turns are kept (starting with a user turn), the limit of
  :class:`mmguard.conversation.Conversation`.

Image parts go through the moderation server's rules (data URLs; http(s) only from allowlisted hosts;
size and pixel limits); more than one image is refused (Llama Guard 3 Vision reads one); other content
part types (audio, files) are refused, since they cannot be judged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..conversation import MAX_TURNS, Conversation, Turn
from ..images import ImageLimits
from ..server.errors import APIError
from ..server.image_sources import ImageFetcher
from ..server.inputs import conversation_from_messages, message_role, normalize_messages

__all__ = ["JudgedPrompt", "prepare_judged_prompt", "recent_history", "recent_turns", "refuse_unjudged_media",
           "unjudgeable_images",
           "with_answer"]

def _assistant_text_parts(content: Any) -> Any:
    """An assistant message's judged content: its text (tool calls and refusal parts are not judged)."""
    if isinstance(content, Sequence) and not isinstance(content, str):
        return [p for p in content if not (isinstance(p, Mapping) and p.get("type") == "refusal")]
    return content


def _has_text(content: Any) -> bool:
    if isinstance(content, str):
        return bool(content.strip())
    if isinstance(content, Sequence):
        return any(isinstance(p, Mapping) and p.get("type") == "text" and str(p.get("text", "")).strip()
                   for p in content)
    return False


_TEXT_PARTS = frozenset({"text", "input_text", "output_text", "refusal"})


def refuse_unjudged_media(parts: Any, where: str, holder: str) -> None:
    """The content parts of something the rails skip (a system, tool or text-less assistant message; a tool's
    output in the Responses API) may not hold an image, audio or a file: the guard would never see it, yet the
    upstream would (400 naming the part). ``where``: the parts' param path; ``holder``: what holds them."""
    if not isinstance(parts, Sequence) or isinstance(parts, str):
        return
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if isinstance(part, Mapping) and kind not in _TEXT_PARTS:
            raise APIError.bad_request(
                f"{where}[{j}]: a {str(kind)[:40]!r} part in {holder} cannot be judged (the guard reads text, and "
                "images in user turns); send it in a user turn, or leave it out",
                param=f"{where}[{j}]", code="unjudgeable_content")


def unjudgeable_images(param: str) -> APIError:
    """The 400 for a request whose answer would hold images: the output rail cannot judge them."""
    return APIError.bad_request(
        f"{param}: an answer with images cannot pass the output rail (the guard reads images in user turns only, "
        "as Llama Guard 3 Vision does); ask for text, or send the request with only the input rail on",
        param=param, code="unjudgeable_content")


class JudgedPrompt:
    """The judged conversation of one request: up to its last user turn (images decoded once)."""

    def __init__(self, conversation: Conversation | None) -> None:
        self.conversation = conversation  # None: the request holds no user message

    @property
    def has_image(self) -> bool:
        return self.conversation is not None and self.conversation.has_image


async def prepare_judged_prompt(messages: Any, limits: ImageLimits, fetcher: ImageFetcher,
                                param: str = "messages") -> list[dict[str, Any]]:
    """Validate ``messages`` and resolve their images (network part: runs on the event loop); errors name
    ``param``, the request's field that held them."""
    if not isinstance(messages, list) or not messages:
        raise APIError.bad_request(f"'{param}' must be a non-empty list of messages", param=param)
    kept: list[Any] = []
    positions: list[int] = []  # each kept message's index in the request (errors name that)
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise APIError.bad_request(f"{param}[{i}] must be an object with 'role' and 'content'",
                                       param=f"{param}[{i}]")
        # the server's reading of roles (human is the user's, agent the assistant's, unknown ones refused): a
        # user turn spelled in a way this rail did not count as one was forwarded unjudged
        role = message_role(msg.get("role"), f"{param}[{i}]")
        holder = f"a {str(msg.get('role'))[:20]!r} message"
        if role in ("system", "tool"):
            refuse_unjudged_media(msg.get("content"), f"{param}[{i}].content", holder)
            continue
        if role == "agent":
            content = _assistant_text_parts(msg.get("content"))
            if not _has_text(content):
                refuse_unjudged_media(content, f"{param}[{i}].content", holder)
                continue
            msg = {"role": "assistant", "content": content}
        kept.append(msg)
        positions.append(i)
    users = [i for i, m in enumerate(kept) if m.get("role") != "assistant"]
    if not users:
        return []
    kept = kept[: users[-1] + 1]
    return await normalize_messages(kept, limits, fetcher, lenient_roles=True, param=param, positions=positions)


def decode_judged_prompt(normalized: list[dict[str, Any]], limits: ImageLimits) -> JudgedPrompt:
    """CPU part (worker thread): decode the image, build the conversation, keep the last turns."""
    if not normalized:
        return JudgedPrompt(None)
    keep = MAX_TURNS - 1  # room for the answer's agent turn
    if len(normalized) > keep:
        start = len(normalized) - keep
        if normalized[start]["role"] != "user":
            start += 1
        normalized = normalized[start:]
    return JudgedPrompt(conversation_from_messages(normalized, limits, None))


def with_answer(prompt: JudgedPrompt, answer: str) -> Conversation:
    """The conversation the output rail judges: the prompt's turns and ``answer`` as the agent's turn (after
    the agent's earlier words when the prompt ends with them: a Responses tool loop continued)."""
    turns: tuple[Turn, ...] = prompt.conversation.turns if prompt.conversation else (Turn("user", ("",)),)
    if turns[-1].role == "agent":
        return Conversation((*turns[:-1], Turn("agent", (*turns[-1].texts, answer))))
    return Conversation((*turns, Turn("agent", (answer,))))


def recent_turns(turns: tuple[Turn, ...], max_chars: int) -> list[Turn]:
    """The last turns holding at most ``max_chars`` characters; the oldest one kept may lose its start."""
    kept: list[Turn] = []
    room = max_chars
    for turn in reversed(turns):
        size = sum(len(s) for s in turn.texts)
        if size <= room:
            kept.append(turn)
            room -= size
            continue
        if room > 0:  # the end of a long turn: the words nearest the new request
            tail = "\n\n".join(turn.texts)[-room:]
            kept.append(Turn(turn.role, (tail,), turn.image))
        break
    return kept[::-1]


def recent_history(prompt: JudgedPrompt, max_chars: int) -> JudgedPrompt:
    """``prompt`` with the turns before its last one cut to their last ``max_chars`` characters (the last
    turn, the one judged, stays whole), starting with a user turn (an empty one when the kept turns start with
    the agent's). The image stays: on its turn, or on the first kept user turn when its own turn was cut."""
    conversation = prompt.conversation
    if conversation is None or max_chars <= 0 or len(conversation.turns) < 2:
        return prompt
    *earlier, last = conversation.turns
    kept = recent_turns(tuple(earlier), max_chars)
    if len(kept) == len(earlier) and kept == earlier:
        return prompt
    image = conversation.image if not any(t.image is not None for t in (*kept, last)) else None
    if not kept or kept[0].role != "user":
        kept.insert(0, Turn("user", ("",)))
    if image is not None:
        kept[0] = Turn("user", kept[0].texts, image)
    return JudgedPrompt(Conversation((*kept, last)))
