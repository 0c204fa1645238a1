"""Response-classification items built from templates: compliance and refusal answers to labeled prompts.

The permissive sets hold few unsafe *responses* (GPTFuzz: answers to 100 questions), so a guard
trained on them learns the topics of those 100 questions rather than the rule Llama Guard applies to
an assistant turn: a reply that goes along with a harmful request is unsafe; a refusal, or a reply
to a benign request, is safe. These items state that rule directly:

* compliance (one of :data:`COMPLIANCE_TEMPLATES`, which restate the request): the prompt's label
  and codes. Each template is used equally often for harmful and benign prompts, so the template
  text carries no label; only the request does.
* refusal (one of :data:`REFUSAL_TEMPLATES`): always safe, for harmful and benign prompts alike.

Per split there are as many harmful as benign compliance items, plus refusals numbering
:data:`REFUSALS_PER_COMPLIANCE` times the harmful ones (half to harmful prompts, half to benign). The
items are then 42% unsafe, so ``mmguard train --unsafe-repeat`` counts the source as balanced and
repeats both labels (repeating only the unsafe ones would make the compliance templates themselves
mean "unsafe", the shortcut described in the model card under v4).

The replies are ours and deliberately generic (no harmful detail). They are made only from train and
validation prompts: templated replies are easy and would flatter test metrics, so the test split's
response items stay the real ones (GPTFuzz, XSTest completions).

Measured: on mmguard-mini v1 (trained from scratch) 3,000 such items did not improve its response F1.
mmguard-mini v2 (pretrained SmolLM2) trains on them in its third stage (``make mini``), after which its
validation F1 rose (responses 0.891 -> 0.911, all items 0.821 -> 0.852; the stage also added 152 steps,
so the two causes are not separated; see its model card).
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from .schema import Example
from .synth import as_list_title, derive_example

__all__ = ["COMPLIANCE_TEMPLATES", "REFUSAL_TEMPLATES", "templated_responses"]

SOURCE = "synth_response_template"

COMPLIANCE_TEMPLATES = (
    "Sure, here is a detailed answer.\n\n{title}\n1. First, gather everything you need and plan each step.\n"
    "2. Then carry it out carefully, one step at a time.\n3. Finally, check the result and adjust as needed.",
    'Of course! Here\'s how you can approach "{request}"\n\nStep 1: Collect the materials and information '
    "you will need.\nStep 2: Follow the process in order without skipping anything.\nStep 3: Review what "
    "you did and repeat if necessary.",
    "Absolutely, I can help with that. {title} The most reliable way is to prepare well, work through it "
    "in stages and keep notes as you go. Let me know if you want more detail on any stage.",
    'Happy to help. To answer "{request}": start small, test your approach on a single case, and once '
    "it works, repeat it at scale. Here are the key points to keep in mind: timing, resources and "
    "attention to detail.",
)
REFUSAL_TEMPLATES = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with this request. If something difficult is going on, consider talking to someone you trust.",
    "Sorry, I won't be able to provide that. Is there something else I can help you with?",
    "I'm not able to help with that, because it could cause harm. I'd be glad to help with something else.",
    "As an AI assistant, I have to decline this request.",
)
REFUSALS_PER_COMPLIANCE = 0.4  # refusals per harmful compliance item; keeps the source >= 40% unsafe
_MAX_PROMPT_CHARS = 300


def _title(request: str) -> str:
    title = as_list_title(request)
    return title if title != request else f"Here is what to do about: {request.rstrip('?.!')}."


def templated_responses(origins: Iterable[Example], *, n: int, rng: random.Random) -> list[Example]:
    """About ``n`` templated response items from short single-turn text prompts of train and validation.

    Per split: ``c`` compliance replies to harmful prompts (unsafe), ``c`` to benign ones (safe), and
    ``0.4 c`` refusals (safe), half to harmful and half to benign prompts, on prompts not used above.
    """
    pool = [
        e
        for e in origins
        if e.task == "prompt" and e.modality == "text" and len(e.messages) == 1 and e.trainable
        and e.split in ("train", "validation") and len(e.prompt_text) <= _MAX_PROMPT_CHARS
    ]  # fmt: skip
    pool.sort(key=lambda e: e.id)
    out: list[Example] = []
    for split in ("train", "validation"):
        group = [e for e in pool if e.split == split]
        unsafe = [e for e in group if e.label == "unsafe"]
        safe = [e for e in group if e.label == "safe"]
        want = round(n * len(group) / max(1, len(pool)))
        refusals = round(want * REFUSALS_PER_COMPLIANCE / (2 + REFUSALS_PER_COMPLIANCE)) // 2
        compliance = min((want - 2 * refusals) // 2, len(unsafe) - refusals, len(safe) - refusals)
        if compliance <= 0:
            continue
        for label_items in (rng.sample(unsafe, compliance + refusals), rng.sample(safe, compliance + refusals)):
            for i, origin in enumerate(label_items):
                out.append(_item(origin, refusal=i >= compliance, template=i))
    return out


def _item(origin: Example, *, refusal: bool, template: int) -> Example:
    request = origin.prompt_text
    if refusal:
        reply, kind = REFUSAL_TEMPLATES[template % len(REFUSAL_TEMPLATES)], "refusal"
    else:
        tpl = COMPLIANCE_TEMPLATES[template % len(COMPLIANCE_TEMPLATES)]
        reply, kind = tpl.format(request=request, title=_title(request)), "compliance"
    return derive_example(origin, SOURCE, prompt=request, response=reply, meta={"kind": kind}, safe=refusal,
                          id_extra=[kind])
