"""Turning request bodies into validated :class:`Conversation` objects: moderation inputs and chat messages.

Every image source is resolved to bytes by :mod:`.image_sources` (never a file path); every text is checked
and counted against the request's budget (:mod:`.request_limits`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..conversation import Conversation, ConversationError, InvalidTextError, check_text
from ..images import ImageError, ImageLimits
from ..policy import PolicyError
from .errors import APIError
from .image_sources import ImageFetcher, image_error, resolve_image
from .request_limits import REQUEST_TEXT
from .settings import ServerSettings

__all__ = [
    "ModerationItem",
    "PendingModeration",
    "checked_text",
    "conversation_from_messages",
    "message_role",
    "normalize_messages",
    "prepare_moderation",
]


def too_many_images(n: int, param: str = "input") -> APIError:
    # the exact message and code OpenAI answers
    return APIError(400, f"Number of images ({n}) exceeds maximum of 1", param=param, code="too_many_images")


def checked_text(value: str, param: str) -> str:
    """The input rule for text (:func:`mmguard.conversation.check_text`) as a 400 ``invalid_text`` naming
    ``param``, and the request's text budget (400 ``text_too_long``)."""
    try:
        text = check_text(value, param)
    except InvalidTextError as err:
        raise APIError(400, str(err), param=param, code="invalid_text") from None
    budget = REQUEST_TEXT.get()
    if budget is not None:
        budget.take(text, param)
    return text


def conversation_error(err: ConversationError | ImageError | PolicyError, param: str | None) -> APIError:
    """A typed input error -> 400 with a code saying which rule was broken."""
    if isinstance(err, InvalidTextError):
        code = "invalid_text"
    elif isinstance(err, ImageError):
        return image_error(err, param)
    elif isinstance(err, PolicyError):
        code = "invalid_policy"
    else:
        code = "invalid_conversation"
    return APIError(400, str(err), param=param, code=code)


# -- moderation inputs ---------------------------------------------------------------------------------


@dataclass
class ModerationItem:
    """One entry of ``results``: one or more conversations (several only with multi_image='each')."""

    conversations: list[Conversation]
    has_text: bool


def _image_ref(part: Mapping[str, Any]) -> Any:
    ref = part.get("image_url")
    return ref.get("url") if isinstance(ref, Mapping) else ref


@dataclass
class PendingModeration:
    """A validated moderation ``input`` whose images are fetched but not yet decoded."""

    strings: list[str] | None = None  # plain string input(s): one item each
    texts: list[str] | None = None  # one multimodal item: its text parts ...
    blobs: list[bytes] | None = None  # ... and its encoded images

    def decode(self, limits: ImageLimits) -> list[ModerationItem]:
        """CPU part (run in a worker thread): decode images, build conversations."""
        if self.strings is not None:
            items = []
            for k, s in enumerate(self.strings):
                param = "input" if len(self.strings) == 1 else f"input[{k}]"
                try:
                    items.append(ModerationItem([Conversation.prompt(s)], True))
                except ConversationError as err:  # one bad item fails the request, naming the item
                    raise conversation_error(err, param) from None
            return items
        return [decode_moderation_item(self.texts or [], self.blobs or [], limits)]


async def prepare_moderation(
    raw_input: str | Sequence[Any], settings: ServerSettings, limits: ImageLimits, fetcher: ImageFetcher
) -> PendingModeration:
    """Validate ``input`` (str, list of str, or one list of text/image_url parts) and fetch images."""
    if isinstance(raw_input, str):
        return PendingModeration(strings=[checked_text(raw_input, "input")])
    if not raw_input:
        raise APIError.bad_request("'input' must not be an empty list", param="input", code="empty_input")
    if all(isinstance(x, str) for x in raw_input):
        if len(raw_input) > settings.max_inputs:
            raise APIError.bad_request(
                f"'input' has {len(raw_input)} items, over the limit of {settings.max_inputs}",
                param="input",
                code="too_many_inputs",
            )
        return PendingModeration(strings=[checked_text(x, f"input[{i}]") for i, x in enumerate(raw_input)])
    texts: list[str] = []
    refs: list[tuple[str, Any]] = []
    for i, part in enumerate(raw_input):
        param = f"input[{i}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(checked_text(part["text"], f"{param}.text"))
        elif kind == "image_url":
            refs.append((f"{param}.image_url.url", _image_ref(part)))
        else:  # schema validation normally catches this first
            raise APIError.bad_request(f"{param}: expected a 'text' or 'image_url' part", param=param)
    if len(refs) > 1 and settings.multi_image == "error":
        raise too_many_images(len(refs))
    if len(refs) > settings.max_images_per_item:
        raise APIError(
            400,
            f"Number of images ({len(refs)}) exceeds maximum of {settings.max_images_per_item}",
            param="input",
            code="too_many_images",
        )
    blobs = [await resolve_image(src, param, limits, fetcher) for param, src in refs]
    return PendingModeration(texts=texts, blobs=blobs)


def decode_moderation_item(texts: list[str], blobs: list[bytes], limits: ImageLimits) -> ModerationItem:
    """Decode images and build the conversations (one per image, or one text-only)."""
    from ..images import load_image

    images = []
    for k, blob in enumerate(blobs):
        try:
            images.append(load_image(blob, limits))
        except ImageError as err:
            raise image_error(err, "input" if len(blobs) == 1 else f"input(image {k + 1})") from None
    has_text = any(t.strip() for t in texts)
    text_parts = [{"type": "text", "text": t} for t in texts]
    try:
        if not images:
            convs = [Conversation.from_messages([{"role": "user", "content": text_parts}])]
        else:
            convs = [
                Conversation.from_messages(
                    [{"role": "user", "content": [{"type": "image", "image": img}, *text_parts]}]
                )
                for img in images
            ]
    except (ConversationError, ImageError) as err:
        raise conversation_error(err, "input") from None
    return ModerationItem(convs, has_text)


# -- chat messages (guard/classify, run-shield) ----------------------------------------------------------

_ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "agent",
    "agent": "agent",
    "chatbot": "agent",
    "tool": "tool",
    "function": "tool",  # OpenAI's legacy tool results
    "ipython": "tool",
    "system": "system",
    "developer": "system",
}


def message_role(raw: Any, where: str) -> str:
    """A message's ``role`` as the guard reads it (``user``, ``agent``, ``tool``, ``system``): one rule for every
    front end, so that no spelling a chat server accepts counts as a user's turn here and as nobody's there;
    400 naming ``where``'s role otherwise."""
    role = _ROLES.get(raw.lower()) if isinstance(raw, str) else None
    if role is None:
        shown = repr(raw[:64]) if isinstance(raw, str) else f"of type {type(raw).__name__}"
        raise APIError.bad_request(f"{where}.role {shown} is not supported; use 'user' or 'assistant'",
                                   param=f"{where}.role")
    return role


def _part_image_src(part: Mapping[str, Any]) -> Any:
    """OpenAI ``image_url`` parts, llama-stack ``image`` parts ({"url": {"uri": ...}} or {"data": ...})."""
    if part.get("type") == "image_url":
        return _image_ref(part)
    img = part.get("image")
    if isinstance(img, Mapping):
        url = img.get("url")
        if isinstance(url, Mapping):
            return url.get("uri")
        if url is not None:
            return url
        return img.get("data")
    return img if img is not None else part.get("url", part.get("data"))


async def normalize_messages(
    messages: Any, limits: ImageLimits, fetcher: ImageFetcher, *, lenient_roles: bool, param: str = "messages",
    positions: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Messages in OpenAI / llama-stack / mmguard chat form -> mmguard chat form with image bytes.

    ``lenient_roles`` (run-shield): system messages are dropped, tool messages count as the agent's,
    consecutive messages of one role are merged, and a first non-user message is read as the user's
    (what llama-stack's own Llama Guard provider does). ``positions``: each message's index in the request,
    for errors, when ``messages`` is a selection of its messages.
    """
    if not isinstance(messages, list) or not messages:
        raise APIError.bad_request(f"'{param}' must be a non-empty list of messages", param=param)
    out: list[dict[str, Any]] = []
    n_images = 0
    for i, msg in enumerate(messages):
        where = f"{param}[{positions[i] if positions is not None else i}]"
        if not isinstance(msg, Mapping):
            raise APIError.bad_request(f"{where} must be an object with 'role' and 'content'", param=where)
        raw_role = msg.get("role")
        role = message_role(raw_role, where)
        if role in ("system", "tool") and not lenient_roles:
            raise APIError.bad_request(
                f"{where}: role {raw_role!r} is not part of the Llama Guard format; "
                "send user and assistant turns",
                param=f"{where}.role",
            )
        if role == "system":
            continue
        if role == "tool":
            role = "agent"
        content = msg.get("content")
        if isinstance(content, Mapping):
            content = [content]
        parts: list[dict[str, Any]] = []
        if isinstance(content, str):
            parts.append({"type": "text", "text": checked_text(content, f"{where}.content")})
        elif isinstance(content, list):
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                if isinstance(part, str):
                    parts.append({"type": "text", "text": checked_text(part, pw)})
                    continue
                if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
                    raise APIError.bad_request(f"{pw} must be an object with a 'type'", param=pw)
                kind = part["type"]
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise APIError.bad_request(
                            f"{pw}: a text part needs a string 'text'", param=f"{pw}.text"
                        )
                    parts.append({"type": "text", "text": checked_text(part["text"], f"{pw}.text")})
                elif kind in ("image_url", "image"):
                    n_images += 1
                    blob = await resolve_image(_part_image_src(part), pw, limits, fetcher)
                    parts.append({"type": "image", "image": blob})
                else:
                    raise APIError.bad_request(
                        f"{pw}: unsupported content type {kind!r} (use 'text' or 'image_url')",
                        param=f"{pw}.type",
                    )
        else:
            raise APIError.bad_request(
                f"{where}.content must be a string or a list of parts", param=f"{where}.content"
            )
        if lenient_roles and out and out[-1]["role"] == role:
            out[-1]["content"].extend(parts)
        else:
            out.append({"role": role, "content": parts})
    if n_images > 1:
        raise too_many_images(n_images, param)
    if not out:
        raise APIError.bad_request(f"'{param}' holds no user or assistant message", param=param)
    if lenient_roles and out[0]["role"] != "user":
        out[0]["role"] = "user"
        if len(out) > 1 and out[1]["role"] == "user":
            out[1]["content"] = out[0]["content"] + out[1]["content"]
            out.pop(0)
    return out


def conversation_from_messages(
    messages: list[dict[str, Any]], limits: ImageLimits, role: str | None, param: str = "messages"
) -> Conversation:
    """CPU part: decode the image and validate turns; ``role`` picks the role judged."""
    for msg in messages:  # image bytes -> decoded here, so the error names the part
        for part in msg["content"]:
            if part["type"] == "image" and isinstance(part["image"], bytes):
                from ..images import load_image

                try:
                    part["image"] = load_image(part["image"], limits)
                except ImageError as err:
                    raise image_error(err, param) from None
    try:
        conv = Conversation.from_messages(messages, limits=limits)
    except (ConversationError, ImageError, PolicyError) as err:
        raise conversation_error(err, param) from None
    if role is not None:
        want = {"user": "user", "assistant": "agent", "agent": "agent"}.get(role.lower())
        if want is None:
            raise APIError.bad_request(f"role must be 'user' or 'agent', got {role!r}", param="role")
        if conv.judged_role != want:
            if want == "user":
                conv = conv.without_last_turn()
            else:
                raise APIError.bad_request(
                    "role 'agent' asked but the conversation ends with a user turn", param="role"
                )
    return conv
