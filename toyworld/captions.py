"""What a caption of the toy world says, word by word: the objects it asks for and which word describes which.

The text stage of the toy teacher (toyworld.teacher, `text_pretrain_steps`) pretrains the text encoders on these
readings. Kept apart from toyworld.world, whose source is part of the key of the teacher's recorded benchmark rows.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from toyworld.world import NUMBER_WORDS, PLURALS


OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def object_descriptions(metadata: dict) -> list[dict]:
    """The objects a prompt asks for, in the order the prompt names them: {"shape", "color" (None: free), "count",
    "relation" (this object's relation to the other one, None without a position clause)}."""
    entries = metadata["include"]
    relation = [None] * len(entries)
    for index, entry in enumerate(entries):
        if "position" in entry:
            name, target = entry["position"]
            relation[index], relation[target] = name, OPPOSITE[name]
    described = [{"shape": e["class"], "color": e.get("color"), "count": e["count"], "relation": r}
                 for e, r in zip(entries, relation)]
    first_word = [next(i for i, word in enumerate(metadata["prompt"].split()) if _names(word, d)) for d in described]
    return [described[i] for i in np.argsort(first_word, kind="stable")]


def _names(word: str, obj: dict) -> bool:
    """Whether `word` (of a prompt of this world's grammar) is one of the words that describe `obj`."""
    return word in (obj["shape"], PLURALS[obj["shape"]], obj["color"], NUMBER_WORDS[obj["count"]])


def word_objects(metadata: dict) -> list[Optional[int]]:
    """For each word of the prompt (split on spaces), the index in `object_descriptions(metadata)` of the object it
    describes (its shape, plural, colour or number word), or None (articles, "photo", "and", relation words)."""
    objects = object_descriptions(metadata)
    owners = []
    for word in metadata["prompt"].split():
        matches = [k for k, obj in enumerate(objects) if _names(word, obj)]
        owners.append(matches[0] if len(matches) == 1 else None)
    return owners
