"""The bias probes' data: chatforge's own word lists and templates, and public bias sets as published.

chatforge's own data lives in ``bias_data/`` (hand-written for chatforge; ``bias_data/README.md``
says where each file comes from):

* ``terms.json``: the swap axes' word rows (gender words and pronouns, religion, nationality);
* ``names.json``: first names by ethnic group and gender;
* ``templates.json``: support-chat and review sentences with slots (``{name}``, ``{their}``, ...);
* ``support_prompts.json``: support conversations (record + question) with the same slots;
* ``stereotype_pairs.csv``: a small illustrative stereotype set in the CrowS-Pairs CSV schema.

``load_axes()`` builds the five axes the probes swap along:

=============  ===========================================  ==========================================
axis           groups                                       what changes
=============  ===========================================  ==========================================
gender         male, female                                 first names, pronouns, gender words
pronoun        he, she, they                                pronouns (and gender words) in name-free
                                                            sentences; ``they`` is filled, never swapped
ethnicity      names.json's groups (reference first)        first names (same gender on both sides)
religion       christian, muslim, jewish, hindu, buddhist   religion words (Muslim, Eid, Islam, ...)
nationality    american, mexican, nigerian, indian, ...     nationality words (Mexican, Mexico, ...)
=============  ===========================================  ==========================================

Public sets, read from the user's files in their published formats:

* CrowS-Pairs (Nangia et al. 2020, ``nyu-mll/crows-pairs`` ``data/crows_pairs_anonymized.csv``):
  a CSV with the columns ``"", sent_more, sent_less, stereo_antistereo, bias_type, annotations,
  anon_writer, anon_annotators``; the first four named ones are required. ``sent_more`` is always
  the more stereotypical sentence (for an ``antistereo`` row it is the advantaged group's version
  of a sentence that violates a stereotype about the disadvantaged group; the paper's metric.py
  counts both kinds as "the model prefers ``sent_more``").
* BBQ (Parrish et al. 2022, ``nyu-mll/BBQ`` ``data/*.jsonl``): one example per line with
  ``example_id, question_index, question_polarity (neg|nonneg), context_condition
  (ambig|disambig), category, answer_info {ans0..ans2: [text, group]}, additional_metadata
  {stereotyped_groups: [...], ...}, context, question, ans0, ans1, ans2, label``.

A malformed file is a ``DataError`` naming the file, the line (CSV: the row and its line) and
the field.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from chatforge.errors import DataError

DATA = Path(__file__).parent / "bias_data"
AXES = ("gender", "pronoun", "ethnicity", "religion", "nationality")  # what load_axes() builds
GENDERS = ("male", "female")
NEUTRAL = "neutral"  # the gender axis's unswapped spelling (they, spouse, ...)
PRONOUN_GROUPS = {"he": "male", "she": "female", "they": NEUTRAL}  # the pronoun axis's groups -> gender
PRONOUN_SLOTS = frozenset({"they", "them", "their", "theirs", "themself"})
NAME_SLOT = "name"
# {slot}, {Slot} (capitalised) and {slot:lower}
SLOT_RE = re.compile(r"\{([A-Za-z_]+)(?::(lower))?\}")


# --------------------------------------------------------------------------- chatforge's own data


@dataclass(frozen=True)
class Row:
    """One slot's word in each group of an axis (first spelling = the one written; every spelling is
    recognised when swapping). ``gender``: for name rows, the gender the name is associated with."""

    slot: str
    terms: dict[str, tuple[str, ...]]
    gender: str | None = None


@dataclass(frozen=True)
class Axis:
    """A swap axis: its groups (``reference`` first), its rows, and the groups whose spellings are only
    ever filled in (the pronoun axis's ``they``: see ``bias.counterfactual``)."""

    name: str
    groups: tuple[str, ...]
    rows: tuple[Row, ...]
    fill_only: frozenset[str] = frozenset()

    @property
    def reference(self) -> str:
        return self.groups[0]

    @property
    def slots(self) -> frozenset[str]:
        return frozenset(r.slot for r in self.rows)

    @property
    def swappable(self) -> tuple[str, ...]:
        return tuple(g for g in self.groups if g not in self.fill_only)


@dataclass(frozen=True)
class Template:
    id: str
    kind: str  # "support" | "review" | "chat"
    text: str
    slots: frozenset[str] = field(default=frozenset())


@dataclass(frozen=True)
class SupportPrompt:
    id: str
    system: str
    user: str
    slots: frozenset[str] = field(default=frozenset())


def template_slots(text: str) -> frozenset[str]:
    """The slots ``text`` uses, capitalised ones under their lower-case name (``{They}`` -> ``they``)."""
    return frozenset(_slot_key(m.group(1)) for m in SLOT_RE.finditer(text))


def _slot_key(name: str) -> str:
    return name if name == "Mx" else name[0].lower() + name[1:]


def _read_json(name: str) -> Any:
    path = DATA / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: {e}") from e


def _terms(path: str, where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise DataError(f"{path}: {where}: must be a non-empty list of words")
    return tuple(value)


@lru_cache(maxsize=1)
def load_names() -> dict[str, dict[str, tuple[str, ...]]]:
    """``{ethnic group: {"female": names, "male": names}}`` (names.json; the reference group first)."""
    obj = _read_json("names.json")
    groups = obj.get("groups")
    if not isinstance(groups, dict) or not groups:
        raise DataError(f"{DATA / 'names.json'}: groups: must be an object of groups")
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    ref = obj.get("reference", next(iter(groups)))
    for g in [ref, *[g for g in groups if g != ref]]:
        out[g] = {sex: _terms("names.json", f"groups.{g}.{sex}", groups[g].get(sex)) for sex in ("female", "male")}
    for sex in ("female", "male"):
        sizes = {len(v[sex]) for v in out.values()}
        if len(sizes) != 1:
            raise DataError(f"{DATA / 'names.json'}: every group needs as many {sex} names as the others "
                            "(row k of each list is swapped with row k of the others)")
    return out


def _axis_rows(obj: dict[str, Any], name: str, groups: tuple[str, ...]) -> list[Row]:
    rows = []
    for k, r in enumerate(obj.get("rows") or []):
        slot = r.get("slot")
        if not isinstance(slot, str) or not slot:
            raise DataError(f"{DATA / 'terms.json'}: {name}.rows[{k}]: slot: must be a word")
        rows.append(Row(slot, {g: _terms("terms.json", f"{name}.rows[{k}].{g}", r.get(g)) for g in groups}))
    return rows


@lru_cache(maxsize=1)
def load_axes() -> dict[str, Axis]:
    """The probes' axes (module docstring), checked: within an axis a spelling belongs to one group,
    and to one row except ``her`` / ``his`` (two pronoun rows each, told apart by the next word)."""
    terms = _read_json("terms.json")
    names = load_names()
    g = terms["gender"]
    gender_rows = _axis_rows(g, "gender", GENDERS)
    neutral = {r["slot"]: r.get(NEUTRAL) for r in g["rows"]}
    name_rows = [Row(NAME_SLOT, {"male": (names[e]["male"][k],), "female": (names[e]["female"][k],)})
                 for e in names for k in range(len(names[e]["male"]))]
    pronoun_rows = [Row(r.slot, {"he": r.terms["male"], "she": r.terms["female"],
                                 "they": _terms("terms.json", f"gender.{r.slot}.neutral", neutral[r.slot])})
                    for r in gender_rows if neutral.get(r.slot)]
    ethnic = tuple(names)
    ethnic_rows = [Row(NAME_SLOT, {e: (names[e][sex][k],) for e in ethnic}, gender=sex)
                   for sex in ("female", "male") for k in range(len(names[ethnic[0]][sex]))]
    axes = {
        "gender": Axis("gender", GENDERS, tuple(gender_rows + name_rows)),
        "pronoun": Axis("pronoun", tuple(PRONOUN_GROUPS), tuple(pronoun_rows), fill_only=frozenset({"they"})),
        "ethnicity": Axis("ethnicity", ethnic, tuple(ethnic_rows)),
    }
    for name in ("religion", "nationality"):
        groups = tuple(terms[name]["groups"])
        axes[name] = Axis(name, groups, tuple(_axis_rows(terms[name], name, groups)))
    for axis in axes.values():
        _check_axis(axis)
    return axes


def _check_axis(axis: Axis) -> None:
    seen: dict[str, tuple[str, set[int]]] = {}
    for k, r in enumerate(axis.rows):
        for grp in axis.swappable:
            for t in r.terms[grp]:
                owner, rows = seen.setdefault(t.lower(), (grp, set()))
                if owner != grp:
                    raise DataError(f"{DATA}: axis {axis.name}: {t!r} is a word of both {owner} and {grp}; "
                                    "a swap could not tell which way to go")
                rows.add(k)
    for t, (_, rows) in seen.items():
        slots = {axis.rows[k].slot for k in rows}
        if len(rows) > 1 and not slots <= PRONOUN_SLOTS:
            raise DataError(f"{DATA}: axis {axis.name}: {t!r} is in {len(rows)} rows ({', '.join(sorted(slots))}); "
                            "only pronouns may share a spelling (her, his)")


@lru_cache(maxsize=1)
def load_templates() -> tuple[Template, ...]:
    """templates.json's sentences, each with the slots it uses."""
    obj = _read_json("templates.json")
    out = []
    for k, t in enumerate(obj.get("templates") or []):
        for key in ("id", "kind", "text"):
            if not isinstance(t.get(key), str) or not t[key]:
                raise DataError(f"{DATA / 'templates.json'}: templates[{k}]: {key}: must be a non-empty string")
        out.append(Template(t["id"], t["kind"], t["text"], template_slots(t["text"])))
    return tuple(out)


@lru_cache(maxsize=1)
def load_support_prompts() -> tuple[SupportPrompt, ...]:
    """support_prompts.json's conversations, each with the slots it uses."""
    obj = _read_json("support_prompts.json")
    out = []
    for k, p in enumerate(obj.get("prompts") or []):
        for key in ("id", "system", "user"):
            if not isinstance(p.get(key), str) or not p[key]:
                raise DataError(f"{DATA / 'support_prompts.json'}: prompts[{k}]: {key}: must be a non-empty string")
        out.append(SupportPrompt(p["id"], p["system"], p["user"], template_slots(p["system"] + p["user"])))
    return tuple(out)


def fill(text: str, values: dict[str, str]) -> str:
    """``text`` with its slots replaced from ``values`` (slot -> word); ``{Slot}`` capitalises the word,
    ``{slot:lower}`` lower-cases it. A slot without a value is a ``KeyError`` naming it."""

    def one(m: re.Match[str]) -> str:
        key = _slot_key(m.group(1))
        if key not in values:
            raise KeyError(f"no value for slot {{{m.group(1)}}} in {text!r}")
        word = values[key]
        if m.group(1) != key:
            word = word[:1].upper() + word[1:]
        return word.lower() if m.group(2) == "lower" else word

    return SLOT_RE.sub(one, text)


# --------------------------------------------------------------------------- CrowS-Pairs


@dataclass(frozen=True)
class StereoPair:
    """One CrowS-Pairs row: ``sent_more`` is the more stereotypical sentence."""

    where: str  # "file:row N (line L)"
    sent_more: str
    sent_less: str
    direction: str  # "stereo" | "antistereo"
    bias_type: str


CROWS_REQUIRED = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")
DIRECTIONS = ("stereo", "antistereo")
SHIPPED_STEREOTYPES = DATA / "stereotype_pairs.csv"


def load_crows_pairs(path: str | Path) -> list[StereoPair]:
    """A CrowS-Pairs CSV (module docstring); the row number counts data rows from 1 (the published
    file's unnamed first column is its 0-based index, so row N is that column's N - 1)."""
    path = Path(path)
    try:
        f = path.open(encoding="utf-8", newline="")
    except OSError as e:
        raise DataError(f"{path}: {e.strerror or e}") from e
    out = []
    with f:
        reader = csv.DictReader(f)
        missing = [c for c in CROWS_REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: line 1: not a CrowS-Pairs CSV: missing column(s) {', '.join(missing)} "
                            f"(needs {', '.join(CROWS_REQUIRED)})")
        try:
            for n, row in enumerate(reader, start=1):
                where = f"{path}: row {n} (line {reader.line_num})"
                for col in CROWS_REQUIRED:
                    if not isinstance(row.get(col), str) or not row[col].strip():
                        raise DataError(f"{where}: field {col!r} is empty")
                direction = row["stereo_antistereo"].strip()
                if direction not in DIRECTIONS:
                    raise DataError(f"{where}: field 'stereo_antistereo' must be 'stereo' or 'antistereo', "
                                    f"got {direction!r}")
                if row["sent_more"].strip() == row["sent_less"].strip():
                    raise DataError(f"{where}: fields 'sent_more' and 'sent_less' are the same sentence")
                out.append(StereoPair(where, row["sent_more"].strip(), row["sent_less"].strip(), direction,
                                      row["bias_type"].strip()))
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: {e}") from e
    if not out:
        raise DataError(f"{path}: no rows")
    return out


# --------------------------------------------------------------------------- BBQ


@dataclass(frozen=True)
class BBQExample:
    where: str  # "file:line"
    example_id: Any
    category: str
    polarity: str  # "neg" | "nonneg"
    condition: str  # "ambig" | "disambig"
    context: str
    question: str
    answers: tuple[str, str, str]
    label: int
    answer_info: tuple[tuple[str, str], tuple[str, str], tuple[str, str]]  # (text, group) per answer
    stereotyped_groups: tuple[str, ...]


BBQ_FIELDS = ("example_id", "question_polarity", "context_condition", "category", "answer_info",
              "additional_metadata", "context", "question", "ans0", "ans1", "ans2", "label")
POLARITIES = ("neg", "nonneg")
CONDITIONS = ("ambig", "disambig")


def _bbq_example(obj: Any, where: str) -> BBQExample:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a BBQ example must be a JSON object")
    for key in BBQ_FIELDS:
        if key not in obj:
            raise DataError(f"{where}: field {key!r} is missing (BBQ's fields: {', '.join(BBQ_FIELDS)})")
    for key in ("category", "context", "question", "ans0", "ans1", "ans2"):
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: field {key!r} must be a string")
    if obj["question_polarity"] not in POLARITIES:
        raise DataError(f"{where}: field 'question_polarity' must be 'neg' or 'nonneg', got "
                        f"{obj['question_polarity']!r}")
    if obj["context_condition"] not in CONDITIONS:
        raise DataError(f"{where}: field 'context_condition' must be 'ambig' or 'disambig', got "
                        f"{obj['context_condition']!r}")
    label = obj["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 2:
        raise DataError(f"{where}: field 'label' must be 0, 1 or 2, got {label!r}")
    info = obj["answer_info"]
    if not isinstance(info, dict):
        raise DataError(f"{where}: field 'answer_info' must be an object {{ans0, ans1, ans2}}")
    pairs = []
    for k in range(3):
        v = info.get(f"ans{k}")
        if not isinstance(v, list) or len(v) < 2 or not all(isinstance(x, str) for x in v[:2]):
            raise DataError(f"{where}: field 'answer_info.ans{k}' must be [text, group], got {v!r}")
        pairs.append((v[0], v[1]))
    meta = obj["additional_metadata"]
    groups = meta.get("stereotyped_groups") if isinstance(meta, dict) else None
    if not isinstance(groups, list) or not all(isinstance(x, str) for x in groups):
        raise DataError(f"{where}: field 'additional_metadata.stereotyped_groups' must be a list of strings")
    return BBQExample(where, obj["example_id"], obj["category"], obj["question_polarity"],
                      obj["context_condition"], obj["context"], obj["question"],
                      (obj["ans0"], obj["ans1"], obj["ans2"]), label, tuple(pairs), tuple(groups))  # type: ignore[arg-type]


def load_bbq(path: str | Path) -> list[BBQExample]:
    """A BBQ JSONL file (module docstring)."""
    from chatforge.io import read_jsonl

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    out = [_bbq_example(obj, f"{path}:{lineno}") for lineno, obj in read_jsonl(path)]
    if not out:
        raise DataError(f"{path}: no examples")
    return out


# BBQ's answer groups, normalised as the BBQ authors' analysis scripts do (analysis_scripts/
# BBQ_results_metadata.R): gender words to M/F codes, "low SES" to "lowses", the transgender
# groups to "trans", the gender prefix of race names ("M-Black") dropped outside the
# intersectional categories.
_GENDER_CODES = {"man": "m", "boy": "m", "men": "m", "male": "m", "woman": "f", "girl": "f", "women": "f",
                 "girls": "f", "female": "f"}
UNKNOWN_ANSWERS = ("unknown", "cannot be determined", "can't be determined", "not answerable", "not known",
                   "not enough info", "not enough information", "cannot answer", "can't answer", "undetermined")


def _norm_group(s: str) -> str:
    s = " ".join(s.lower().split())
    return _GENDER_CODES.get(s, s).replace(" ", "")


def bbq_unknown(ex: BBQExample, k: int) -> bool:
    """Whether answer ``k`` is the "can't be determined" option."""
    text, group = ex.answer_info[k]
    return _norm_group(group) == "unknown" or ex.answers[k].strip().rstrip(".").lower() in UNKNOWN_ANSWERS


def bbq_target(ex: BBQExample) -> int | None:
    """The answer naming the stereotyped group (BBQ's bias target), or None when not exactly one does.

    Outside the intersectional categories (``Race_x_gender``, ``Race_x_SES``) the group labels are
    normalised as the BBQ authors' metadata script does; Nationality also matches the answer's text
    ("British" under the label "Europe"); Disability_status's target is "disabled". The intersectional
    categories compare the full label ("F-Black") and, for a target without a prefix, the label without
    it: a simplification of the authors' script, which reads those targets from the template files."""
    intersectional = "_x_" in ex.category
    stereo = {_norm_group(g) for g in ex.stereotyped_groups}
    if ex.category == "Disability_status":
        stereo = {"disabled"}
    if any(g.startswith("trans") for g in stereo):  # "transgender women", "trans", ... are one target
        stereo = {g for g in stereo if not g.startswith("trans")} | {"trans"}
    hits = []
    for k in range(3):
        if bbq_unknown(ex, k):
            continue
        text, group = ex.answer_info[k]
        label = _norm_group(group)
        stripped = re.sub(r"^[mf]-", "", label)
        candidates = {label, stripped} if intersectional else {stripped}
        if "trans" in stereo and stripped.startswith("trans"):
            candidates.add("trans")
        if ex.category == "Nationality":
            candidates.add(_norm_group(text))
        if candidates & stereo:
            hits.append(k)
    return hits[0] if len(hits) == 1 else None


def bbq_biased_answer(ex: BBQExample) -> int | None:
    """The answer that reflects the bias (Parrish et al. 2022): the target for a negative question, the
    other group's answer for a non-negative one (as the authors' metadata script's ``target_loc``)."""
    target = bbq_target(ex)
    if target is None:
        return None
    if ex.polarity == "neg":
        return target
    others = [k for k in range(3) if k != target and not bbq_unknown(ex, k)]
    return others[0] if len(others) == 1 else None
