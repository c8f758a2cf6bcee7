"""Report sentences for ``report_phantoms``: each query is a short report line with the mask of what it describes.

A query names a kind (``report_phantoms.KINDS``), optionally sides (the PATIENT's, ``SIDES``) and a zone; its mask
(``[J, I]`` bool, the phantom's layout) is the union of the phantom's opacities matching all three, so it is empty
when nothing matches. Roles:
- ``"describes"``: at least one opacity matches; the sentence gives their count or none;
- ``"absent"``: the kind is not in the image (empty mask);
- ``"wrong-side"``: the kind is in the image but only on the other side (empty mask): the location test.
An absent or wrong-side line names a count as often as a describing one, and an absent kind is also asked on both
sides (a user asks "two areas of consolidation in the left lung" or "bilateral effusions" whatever the image holds):
no word of the sentence alone may tell the network that the kind is there.

Two template sets with disjoint wording beyond the content words (sides, counts in digits or words, "lung"):
``style="train"`` for training, ``style="rephrased"`` (synonyms, other word order, zone synonyms, clinical filler)
for evaluation only. ``style="varied"`` is the training wording with generic variety around the content words (more
templates and word orders, a lead-in such as "impression:", a trailer such as "unchanged"), none of it a word only the
rephrased set uses: the kind, side and zone words stay the training ones, so it teaches that the words around them
do not matter without showing the evaluation's synonyms. Every random choice is one ``rng.random()`` draw whatever
the style, so the same rng state gives the same content in every style. Sentences stay under about 20 CLIP BPE tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .report_phantoms import KINDS, SIDES, ZONES, ReportPhantom

ROLES = ("describes", "absent", "wrong-side")
NORMAL_REPORTS = (
    "no acute cardiopulmonary abnormality",
    "clear lungs",
    "no focal opacity",
    "the lungs are clear",
    "normal chest radiograph",
)

# kind -> (name, one unit, several units); rephrased: a tuple of such triples to choose from.
_TRAIN_KIND = {
    "ground-glass opacity": ("ground-glass opacity", "ground-glass opacity", "ground-glass opacities"),
    "consolidation": ("consolidation", "area of consolidation", "areas of consolidation"),
    "pleural effusion": ("pleural effusion", "pleural effusion", "pleural effusions"),
}
_REPHRASED_KIND = {
    "ground-glass opacity": (("GGO", "focus of GGO", "foci of GGO"),
                             ("hazy opacity", "hazy opacity", "hazy opacities")),
    "consolidation": (("airspace consolidation", "patch of airspace consolidation",
                       "patches of airspace consolidation"),
                      ("airspace opacity", "airspace opacity", "airspace opacities")),
    "pleural effusion": (("pleural fluid", "collection of pleural fluid", "collections of pleural fluid"),
                         ("effusion", "effusion", "effusions")),
}
_TRAIN_COUNT = {1: "a single", 2: "two", 3: "three"}  # more: "multiple"
_REPHRASED_COUNT = {1: "one", 2: "2", 3: "3"}  # more: "several"
_REPHRASED_ZONE = {"upper": ("upper zone", "apex"), "lower": ("lower zone", "lung base", "base")}

# Templates by scope. {name}: the kind; {counted}: count + unit; {n}: count; {side}; {zone}.
_TRAIN = {
    "bilateral": ("bilateral {name}, {n} areas", "{counted} in both lungs"),
    "all": ("{counted}", "{name} present"),
    "side": ("{name} in the {side} lung", "{counted} in the {side} lung"),
    "zone": ("{counted} in the {side} {zone} lung", "{name} of the {side} {zone} lung"),
}
_REPHRASED = {
    "bilateral": ("findings: {name} bilaterally, {n} foci", "there is {counted} in both hemithoraces"),
    "all": ("there is {counted}", "findings: {counted} noted", "there is {name}", "{name} noted"),
    "side": ("there is {name} in the {side} hemithorax", "{side}-sided {name} noted",
             "findings: {counted} on the {side}"),
    "zone": ("{side} {zone} {name}", "in the {side} {zone}, {counted}", "there is {counted} in the {side} {zone}"),
}
_SUFFIX = ", consistent with infection"  # rephrased only, for ground-glass and consolidation, sometimes
# "varied" only: templates beside _TRAIN's, and a lead-in / trailer (module docstring)
_VARIED = {
    "bilateral": ("{name} in both lungs", "{counted} across both lungs", "both lungs: {name}"),
    "all": ("{name}", "{counted} seen", "evidence of {counted}", "{counted} visible"),
    "side": ("{side} lung: {name}", "{side} lung shows {counted}", "{counted}, {side} lung",
             "{name} within the {side} lung"),
    "zone": ("{side} {zone} lung: {counted}", "{counted} at the {side} {zone} lung", "{side} lung, {zone} part: {name}",
             "{name} affecting the {side} {zone} lung"),
}
_LEADS = ("impression:", "cxr:", "radiograph shows", "film:", "today:", "report:")
_TRAILERS = ("seen", "identified", "unchanged", "new since prior", "likely", "as before", "visible")
STYLES = ("train", "rephrased", "varied")


@dataclass
class Query:
    """One report line. mask: ``[J, I]`` bool, union of the described opacities (all False when none); sides: the
    sides the sentence names (() = not restricted); zone: the zone it names or None; count: opacities described."""

    text: str
    mask: np.ndarray
    kind: str
    sides: tuple[str, ...]
    zone: str | None
    count: int
    role: str


def matching(phantom: ReportPhantom, kind: str, sides: tuple[str, ...] = (), zone: str | None = None) -> list:
    """The phantom's opacities of ``kind`` on one of ``sides`` (any when empty) and in ``zone`` (any when None)."""
    return [o for o in phantom.opacities
            if o.kind == kind and (not sides or o.side in sides) and zone in (None, o.zone)]


def union_mask(phantom: ReportPhantom, opacities: list) -> np.ndarray:
    """``[J, I]`` bool: the union of ``opacities``' masks (all False when none), e.g. of ``matching``'s."""
    mask = np.zeros(phantom.image.shape, bool)
    for o in opacities:
        mask |= o.mask
    return mask


def _pick(seq, u):
    return seq[min(int(u * len(seq)), len(seq) - 1)]


# the counts an absent or wrong-side line names (count, share), as describing lines' counts fall (training seeds
# 0..599: one side, a zone or any: 1 in 95%, 2 in 5%; bilateral: 2 in 83%, 3 in 17%), so no number tells presence
CLAIMED_COUNTS = {"one": ((1, 0.95), (2, 0.05)), "bilateral": ((2, 0.83), (3, 0.17))}


def claimed_count(u0: float, bilateral: bool = False) -> int:
    """The count an absent or wrong-side line's wording names when its template has one (``CLAIMED_COUNTS``), from
    the digits of ``u0`` below the template choice, so it costs no rng draw (a seed's roles, kinds, sides and zones
    stay as drawn)."""
    v = (u0 * 3000) % 1.0
    for count, share in CLAIMED_COUNTS["bilateral" if bilateral else "one"]:
        if v < share:
            return count
        v -= share
    return count


def render(kind: str, sides: tuple[str, ...], zone: str | None, count: int, style: str, u) -> str:
    """The sentence for this content; ``u``: 4 uniform numbers in [0, 1) choosing template and synonyms.
    count 0 (absent / wrong-side) names ``claimed_count`` where the template has a number (module docstring).
    ``sides`` of both SIDES means bilateral."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    train = style != "rephrased"
    name, one, many = _TRAIN_KIND[kind] if train else _pick(_REPHRASED_KIND[kind], u[1])
    scope = "zone" if zone else "bilateral" if len(sides) == 2 else "side" if sides else "all"
    templates = _TRAIN[scope] + _VARIED[scope] if style == "varied" else (_TRAIN if train else _REPHRASED)[scope]
    said = count or claimed_count(u[0], scope == "bilateral")
    if scope == "bilateral" and said < 2:
        templates = [t for t in templates if "{counted}" not in t and "{n}" not in t] or ["{name}"]
    words = _TRAIN_COUNT if train else _REPHRASED_COUNT
    n = words.get(said, "multiple" if train else "several")
    counted = f"{n} {one if said == 1 else many}"
    zone_word = zone if train or zone is None else _pick(_REPHRASED_ZONE[zone], u[2])
    side = sides[0] if sides else ""
    template = _pick(templates, u[0])
    text = template.format(name=name, counted=counted, n=n, side=side, zone=zone_word)
    if said > 1 and "{counted}" in template:
        text = text.replace("there is ", "there are ")
    if not train and kind != "pleural effusion" and u[3] < 0.3:
        text += _SUFFIX
    if style == "varied":  # a lead-in (30%), a trailer (30%, 10% both), chosen by u[3]'s lower digits
        if u[3] < 0.3:
            text = f"{_pick(_LEADS, (u[3] * 997) % 1.0)} {text}"
        if 0.2 <= u[3] < 0.5 and not text.endswith(_TRAILERS):
            text = f"{text} {_pick(_TRAILERS, (u[3] * 7919) % 1.0)}"
    return text


def _query(phantom, kind, sides, zone, role, style, u) -> Query:
    found = matching(phantom, kind, sides, zone)
    count = len(found)
    return Query(render(kind, sides, zone, count, style, u), union_mask(phantom, found), kind, sides, zone, count, role)


def _candidates(phantom: ReportPhantom):
    """(role, kind, sides, zone) of every query this phantom supports, in a fixed order."""
    out = {r: [] for r in ROLES}
    for kind in KINDS:
        on = [s for s in SIDES if matching(phantom, kind, (s,))]
        zones = ("lower",) if kind == "pleural effusion" else ZONES  # an "upper effusion" is not a report line
        if not on:
            out["absent"] += [(kind, ()), (kind, SIDES)] + [(kind, (s,), z) for s in SIDES for z in (None, *zones)]
            continue
        out["describes"].append((kind, tuple(on) if len(on) == 2 else ()))
        out["describes"] += [(kind, (s,)) for s in on]
        out["describes"] += [(kind, (s,), z) for s in on for z in ZONES if matching(phantom, kind, (s,), z)]
        if len(on) == 1:
            other = [s for s in SIDES if s not in on][0]
            out["wrong-side"] += [(kind, (other,))] + [(kind, (other,), z) for z in zones]
    return {r: [c if len(c) == 3 else (*c, None) for c in v] for r, v in out.items()}


def sample_queries(phantom: ReportPhantom, rng: np.random.Generator, n: int = 3, style: str = "train") -> list[Query]:
    """``n`` queries about ``phantom``: the first describes an opacity when there is one; the others describe with
    probability 0.5, else name the other side of a one-sided kind (when there is one, probability 0.6), else an
    absent kind. Each query costs the same ``rng`` draws whatever the style."""
    cands = _candidates(phantom)
    queries = []
    for i in range(n):
        r_role, r_cand, u = rng.random(), rng.random(), rng.random(4)
        if cands["describes"] and (i == 0 or r_role < 0.5):
            role = "describes"
        elif cands["wrong-side"] and (r_role < 0.8 or not cands["absent"]):
            role = "wrong-side"
        elif cands["absent"]:
            role = "absent"
        else:
            role = "describes" if cands["describes"] else "wrong-side"
        kind, sides, zone = _pick(cands[role], r_cand)
        queries.append(_query(phantom, kind, sides, zone, role, style, u))
    return queries


def words(text: str) -> set[str]:
    """Lower-case words of a sentence (hyphenated words kept whole, punctuation dropped)."""
    return set(re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", text.lower()))


def train_vocabulary(style: str = "train") -> set[str]:
    """Every word the training templates can produce; ``style="varied"`` adds the words of its variety."""
    vocab: set[str] = set()
    if style == "varied":
        variety = [re.sub(r"\{\w+\}", " ", t) for ts in _VARIED.values() for t in ts] + [*_LEADS, *_TRAILERS]
        vocab |= words(" ".join(variety))
    for kind in KINDS:
        for sides in ((), *((s,) for s in SIDES), SIDES):
            for zone in (None, *ZONES) if len(sides) == 1 else (None,):
                for count in (0, 1, 2, 3, 4):
                    for t in range(3):
                        vocab |= words(render(kind, sides, zone, count, "train", (t / 3 + 1e-3, 0.0, 0.0, 0.0)))
    return vocab
