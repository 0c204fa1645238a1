"""Safety policy: the hazard taxonomy a guard judges against.

The default policy is the 13 MLCommons hazards of Llama Guard 3 Vision. Each category keeps the
three spellings that exist: the short ``label`` the chat template puts in the prompt
(``"Violent Crimes."``), the model-card ``title`` and the long model-card ``description``.
Only the label (and optionally the description) ever reaches the model.

Custom policies come from YAML/JSON. Codes are kept as given (excluding a code never renumbers the
others, exactly like the template's ``excluded_category_keys``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .conversation import check_text

__all__ = [
    "DEFAULT_POLICY",
    "Category",
    "Policy",
    "PolicyError",
    "load_policy",
]

# A code must be one short word: it is written by the model on one line, comma separated.
_CODE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,15}$")
_MAX_LABEL_CHARS = 200
_MAX_DESCRIPTION_CHARS = 4000
_MAX_CATEGORIES = 64


class PolicyError(ValueError):
    """A policy file or definition is invalid; the message names the offending field."""


@dataclass(frozen=True)
class Category:
    """One hazard category.

    code: what the model writes (``S1``).
    label: the text after ``S1: `` in the prompt (``Violent Crimes.``).
    title: a human-readable name (``Violent Crimes``).
    description: optional long description; added to the prompt only when a policy asks for it.
    """

    code: str
    label: str
    title: str = ""
    description: str = ""

    @property
    def name(self) -> str:
        return self.title or self.label.rstrip(". ")


_MLCOMMONS: tuple[tuple[str, str, str, str], ...] = (
    (
        "S1",
        "Violent Crimes.",
        "Violent Crimes",
        "Responses that enable, encourage, or endorse the commission of violent crimes, including: (1) unlawful "
        "violence toward people (ex: terrorism, genocide, murder, hate-motivated violent crimes, child abuse, "
        "assault, battery, kidnapping) and (2) unlawful violence toward animals (ex: animal abuse)",
    ),
    (
        "S2",
        "Non-Violent Crimes.",
        "Non-Violent Crimes",
        "Responses that enable, encourage, or endorse the commission of non-violent crimes, including: (1) "
        "personal crimes (ex: labor trafficking, threats, intimidation, hate-motivated non-violent crimes), (2) "
        "financial crimes (ex: fraud, scams, money laundering), (3) property crimes (ex: theft, arson, "
        "vandalism), (4) drug crimes (ex: creating or using regulated substances), (5) weapons crimes (ex: "
        "producing unlicensed firearms), and (6) cyber crimes (ex: hacking)",
    ),
    (
        "S3",
        "Sex Crimes.",
        "Sex-Related Crimes",
        "Responses that enable, encourage, or endorse the commission of sex-related crimes, including: (1) sex "
        "trafficking, (2) sexual assault (ex: rape), (3) sexual harassment (physical, verbal, or visual), and (4) "
        "prostitution",
    ),
    (
        "S4",
        "Child Exploitation.",
        "Child Sexual Exploitation",
        "Responses that contain, describe, enable, encourage, or endorse the sexual abuse of children",
    ),
    (
        "S5",
        "Defamation.",
        "Defamation",
        "Responses that are both verifiably false and likely to injure a living person’s reputation",
    ),
    (
        "S6",
        "Specialized Advice.",
        "Specialized Advice",
        "Responses that contain specialized financial, medical, or legal advice, or that indicate dangerous "
        "activities or objects are safe",
    ),
    (
        "S7",
        "Privacy.",
        "Privacy",
        "Responses that contain sensitive, nonpublic personal information that could undermine someone’s "
        "physical, digital, or financial security",
    ),
    (
        "S8",
        "Intellectual Property.",
        "Intellectual Property",
        "Responses that may violate the intellectual property rights of any third party",
    ),
    (
        "S9",
        "Indiscriminate Weapons.",
        "Indiscriminate Weapons",
        "Responses that enable, encourage, or endorse the creation of indiscriminate weapons, including: (1) "
        "chemical weapons (ex: nerve gas), (2) biological weapons (ex: anthrax), (3) radiological weapons (ex: "
        "cobalt bombs), (4) nuclear weapons (ex: fission bombs), and (5) high-yield explosive weapons (ex: "
        "cluster munitions)",
    ),
    (
        "S10",
        "Hate.",
        "Hate",
        "Responses that demean or dehumanize people on the basis of their sensitive, personal characteristics "
        "(i.e., race, color, ethnicity, national origin, disability, religious affiliation, caste, sexual "
        "orientation, sex, gender identity, and/or serious disease)",
    ),
    (
        "S11",
        "Self-Harm.",
        "Suicide & Self-Harm",
        "Responses that enable, encourage, or endorse acts of intentional self-harm, including: (1) suicide, (2) "
        "self-injury (ex: cutting), and (3) disordered eating",
    ),
    ("S12", "Sexual Content.", "Sexual Content", "Responses that contain erotica"),
    (
        "S13",
        "Elections.",
        "Elections",
        "Responses that contain factually incorrect information about electoral systems and processes, "
        "including in the time, place, or manner of voting in civic elections",
    ),
)


@dataclass(frozen=True)
class Policy:
    """An ordered set of categories plus the codes excluded from the prompt.

    ``include_descriptions`` appends each category's description after its label, separated by a
    newline, inside the category value (as Meta's customisation cookbook does).
    """

    categories: tuple[Category, ...]
    excluded: frozenset[str] = field(default_factory=frozenset)
    include_descriptions: bool = False
    name: str = "custom"

    def __post_init__(self) -> None:
        if isinstance(self.excluded, str):  # one code, not its characters
            object.__setattr__(self, "excluded", frozenset({self.excluded}))
        elif not isinstance(self.excluded, frozenset):  # a list or set: `excluded - seen` needs a set
            object.__setattr__(self, "excluded", frozenset(self.excluded))
        if not isinstance(self.categories, tuple):
            object.__setattr__(self, "categories", tuple(self.categories))
        check_text(self.name, "policy name", PolicyError)
        _validate(self.categories, self.excluded)

    # -- views --------------------------------------------------------------------------------
    @property
    def active(self) -> tuple[Category, ...]:
        """Categories that appear in the prompt, in policy order."""
        return tuple(c for c in self.categories if c.code not in self.excluded)

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(c.code for c in self.categories)

    @property
    def active_codes(self) -> tuple[str, ...]:
        return tuple(c.code for c in self.active)

    def category(self, code: str) -> Category:
        for c in self.categories:
            if c.code == code:
                return c
        raise KeyError(f"unknown category code {code!r}; policy codes: {', '.join(self.codes)}")

    def prompt_value(self, category: Category) -> str:
        """The value the template prints after ``CODE: ``."""
        if self.include_descriptions and category.description:
            return f"{category.label}\n{category.description}"
        return category.label

    def template_categories(self) -> dict[str, str]:
        """The ``categories`` dict of the official chat template (all codes, exclusions separate)."""
        return {c.code: self.prompt_value(c) for c in self.categories}

    # -- derivations --------------------------------------------------------------------------
    def exclude(self, codes: Iterable[str]) -> Policy:
        checked = [check_text(c, f"excluded code #{i + 1}", PolicyError) for i, c in enumerate(codes)]
        codes = frozenset(c.strip() for c in checked if c.strip())
        unknown = sorted(codes - set(self.codes))
        if unknown:
            raise PolicyError(
                f"cannot exclude unknown category code(s) {', '.join(unknown)}; policy codes: {', '.join(self.codes)}"
            )
        return replace(self, excluded=self.excluded | codes)

    def with_descriptions(self, on: bool = True) -> Policy:
        return replace(self, include_descriptions=on)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "include_descriptions": self.include_descriptions,
            "excluded": sorted(self.excluded, key=self.codes.index),
            "categories": [
                {"code": c.code, "label": c.label, "title": c.title, "description": c.description}
                for c in self.categories
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "policy") -> Policy:
        return _policy_from_mapping(data, source)


def _validate(categories: Sequence[Category], excluded: frozenset[str]) -> None:
    if not categories:
        raise PolicyError("a policy needs at least one category")
    if len(categories) > _MAX_CATEGORIES:
        raise PolicyError(f"a policy may hold at most {_MAX_CATEGORIES} categories, got {len(categories)}")
    seen: set[str] = set()
    for i, c in enumerate(categories):
        if not isinstance(c, Category):
            raise PolicyError(f"category #{i + 1} must be a Category, got {type(c).__name__}")
        where = f"category #{i + 1} ({c.code!r})"  # repr: escapes control characters and surrogates
        for name in ("label", "title", "description"):
            check_text(getattr(c, name), f"{where} {name}", PolicyError)
        if not isinstance(c.code, str) or not _CODE_RE.match(c.code):
            raise PolicyError(
                f"{where}: code must be a letter followed by up to 15 letters, digits or '_' (e.g. S1), got {c.code!r}"
            )
        if c.code.upper() in {s.upper() for s in seen}:  # the model's answer is read without regard to case
            raise PolicyError(f"{where}: duplicate code {c.code!r} (codes must differ in more than case)")
        seen.add(c.code)
        if not isinstance(c.label, str) or not c.label.strip():
            raise PolicyError(f"{where}: label must be a non-empty string")
        if len(c.label.splitlines()) > 1 or c.label.endswith(("\n", "\r")):  # \r, U+2028 ... break lines too
            raise PolicyError(f"{where}: label must be one line (put long text in 'description')")
        if len(c.label) > _MAX_LABEL_CHARS:
            raise PolicyError(f"{where}: label longer than {_MAX_LABEL_CHARS} characters")
        if len(c.description) > _MAX_DESCRIPTION_CHARS:
            raise PolicyError(f"{where}: description longer than {_MAX_DESCRIPTION_CHARS} characters")
    for code in excluded:
        check_text(code, "excluded code", PolicyError)
    unknown = sorted(excluded - seen)
    if unknown:
        raise PolicyError(f"excluded code(s) {', '.join(unknown)} are not in the policy")
    if not (seen - excluded):
        raise PolicyError("every category is excluded; at least one must stay active")


_CATEGORY_KEYS = frozenset({"code", "label", "name", "title", "description"})


def _flag(value: Any, where: str) -> bool:
    """A yes/no field: true or false only (``bool("false")`` is True: a quoted "false" turned descriptions on)."""
    if not isinstance(value, bool):
        raise PolicyError(f"{where} must be true or false, got {str(value)[:40]!r}")
    return value


def _scalar(value: Any, where: str) -> str:
    """A policy field as text: a string or a number. Anything else is refused before it is turned into a string:
    YAML aliases let a 500-byte file hold a list that str() expands to gigabytes."""
    if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return str(value)
    raise PolicyError(f"{where} must be a string, got {type(value).__name__}")


def _shown_key(key: Any) -> str:
    return repr(key[:40]) if isinstance(key, str) else f"a key of type {type(key).__name__}"


def _policy_from_mapping(data: Mapping[str, Any], source: str) -> Policy:
    if not isinstance(data, Mapping):
        raise PolicyError(f"{source}: top level must be a mapping with a 'categories' list")
    raw = data.get("categories")
    if raw is None:
        raise PolicyError(f"{source}: missing 'categories'")
    items: list[Category] = []
    if isinstance(raw, Mapping):  # {"S1": "Violent Crimes.", ...} exactly like the template's dict
        for code, value in raw.items():
            if not isinstance(value, str):
                raise PolicyError(f"{source}: category {code!r}: value must be a string label")
            label, _, description = value.partition("\n")
            items.append(Category(code=_scalar(code, f"{source}: a category's code"), label=label,
                                  description=description))
    elif isinstance(raw, list):
        for i, entry in enumerate(raw):
            if not isinstance(entry, Mapping):
                raise PolicyError(f"{source}: categories[{i}] must be a mapping with 'code' and 'label'")
            unknown_keys = [k for k in entry if k not in _CATEGORY_KEYS]
            if unknown_keys:
                shown = ", ".join(sorted(_shown_key(k) for k in unknown_keys))
                raise PolicyError(f"{source}: categories[{i}]: unknown key(s) {shown}")
            code = entry.get("code")
            label = entry.get("label", entry.get("name"))
            if code is None or label is None:
                raise PolicyError(f"{source}: categories[{i}] needs 'code' and 'label' (or 'name')")
            where = f"{source}: categories[{i}]"
            items.append(
                Category(
                    code=_scalar(code, f"{where}.code"),
                    label=_scalar(label, f"{where}.label"),
                    title=_scalar(entry.get("title", ""), f"{where}.title"),
                    description=_scalar(entry.get("description", "") or "", f"{where}.description"),
                )
            )
    else:
        raise PolicyError(f"{source}: 'categories' must be a list or a mapping")
    excluded = data.get("excluded", data.get("exclude", []))
    if isinstance(excluded, str):
        excluded = [excluded]
    if not isinstance(excluded, list):
        raise PolicyError(f"{source}: 'excluded' must be a list of codes")
    name = data.get("name")
    if name is None:
        name = Path(source).stem if source != "policy" else "custom"
    if not isinstance(name, (str, int, float)) or isinstance(name, bool):
        raise PolicyError(f"{source}: 'name' must be a string")
    try:
        return Policy(
            categories=tuple(items),
            excluded=frozenset(_scalar(e, f"{source}: excluded") for e in excluded),
            include_descriptions=_flag(data.get("include_descriptions", False), f"{source}: include_descriptions"),
            name=str(name),
        )
    except PolicyError as err:
        raise PolicyError(f"{source}: {err}") from None


def load_policy(spec: str | Path | Mapping[str, Any] | Policy | None) -> Policy:
    """Load a policy from ``None`` (the default), a Policy, a mapping, ``"default"``, or a YAML/JSON path."""
    if spec is None:
        return DEFAULT_POLICY
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, Mapping):
        return Policy.from_dict(spec)
    if str(spec) in {"default", "mlcommons", "llama-guard-3-vision"}:
        return DEFAULT_POLICY
    path = Path(spec)
    try:
        found = path.is_file()
    except (OSError, ValueError):  # a NUL byte or an over-long name: not a file
        found = False
    if not found:
        raise PolicyError(f"policy file not found: {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PolicyError(f"{path}: cannot read policy: {err}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # parse errors from either library
        raise PolicyError(f"{path}: cannot parse policy: {err}") from None
    return _policy_from_mapping(data, str(path))


DEFAULT_POLICY = Policy(
    categories=tuple(Category(code, label, title, desc) for code, label, title, desc in _MLCOMMONS),
    name="llama-guard-3-vision",
)
