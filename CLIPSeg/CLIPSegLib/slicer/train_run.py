"""Teach a model the user's own segments: one fine-tuning run from the scene, for the Slicer panel and console (no Qt).

``TrainRun(pairs)`` takes (volume node, segmentation node) pairs whose segments the user painted on a few slices. It
checks them, writes each volume as an NRRD and each segment as a binary mask NRRD on its volume's grid (voxels
``[K,J,I]``, the volume's geometry) into a temporary folder, with the training table ``data.csv``
(``image,mask,phrase,slices``), starts ``clipseg finetune`` on it in a background process (``background.BackgroundJob``:
progress, cancel that kills the process tree, the folder removed in every case), and when it has finished imports the
written model into the catalogue (``models.store.import_spec``), so that it is in the panel's model list and every
command knows it by its id. The scene is never changed.

Phrases are the segment names (spaces collapsed; segments of one node with the same name, ignoring case, are one
phrase, their masks joined). Labelled slices, per segmentation node: the K slices (first array axis, the volume's
I,J planes) that hold any voxel of any of its segments. A slice painted for one structure is therefore labelled for
every segment of that node: a segment empty there is taught as absent there (a true negative). This is how one paints
in the Segment Editor (each structure on the slices one works on); a user who painted only one structure on a slice
where another is present should paint that one too, or split the two into separate segmentation nodes. Slices that
no segment of the node touches are unlabelled: never used, not even as negatives. A segment empty on every
labelled slice of every pair teaches nothing and is left out (with a note).
"""

from __future__ import annotations

import csv
import difflib
import re
from pathlib import Path

import numpy as np

from ..checks import check_prompts
from ..errors import ClipSegError, InputError
from ..io.outputs import write_volume
from ..models.spec import DEFAULT_MODEL
from ..options import INPUT_SIZES, check_device, check_precision
from .background import BackgroundJob, finetune_command
from .mrml_bridge import check_untransformed, segment_to_array, volume_to_array

DATA_COLUMNS = ("image", "mask", "phrase", "slices")
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_steps(steps) -> int | None:
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InputError(f"steps {steps!r} must be a whole number of training steps of at least 1, e.g. 300")
    return int(steps)


def check_input_size(size) -> int | None:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size not in INPUT_SIZES:
        raise InputError(f"input size {size!r} must be a whole number of pixels, a multiple of 32 from 32 to 1024 "
                         f"(e.g. 256 for slices much larger than the model's 128), or None for the model's own")
    return int(size)


# Options of a TrainRun (Logic keywords): name -> (check, default). ``force`` goes to the command; ``replace`` lets a
# new model take the id of a model trained or imported before (removed when the new one is imported); ``inputSize``
# is `clipseg finetune --input-size` (pixels; cliptnseg parents); ``precision`` its --precision (the panel's Precision).
TRAIN_OPTIONS = {"device": (check_device, "auto"), "precision": (check_precision, "fp32"),
                 "steps": (check_steps, None), "force": (bool, False),
                 "replace": (bool, False), "inputSize": (check_input_size, None)}


def train_options(**options) -> dict:
    """Every option of ``TRAIN_OPTIONS``, checked; InputError for an unknown name (naming the closest) or value."""
    for key in options:
        if key not in TRAIN_OPTIONS:
            close = difflib.get_close_matches(key, list(TRAIN_OPTIONS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"unknown training option {key!r}{hint}; the options are {', '.join(TRAIN_OPTIONS)}")
    return {name: check(options.get(name, default)) for name, (check, default) in TRAIN_OPTIONS.items()}


def check_model_id(model_id: str) -> str:
    """A new model's id: a plain name (letters, digits, '.', '_', '-'; it names the model's files)."""
    text = str(model_id).strip()
    if not MODEL_ID.fullmatch(text) or text.startswith("registry"):
        raise InputError(f"model name {model_id!r} must be a plain name of letters, digits, '-', '_' or '.' (at most "
                         f"100, not starting with 'registry'), e.g. 'my-liver-lesion'")
    return text


def model_origin(model_id: str) -> str | None:
    """How ``model_id`` is taken in the catalogue: 'embedded', 'registry', 'imported' (a model trained or imported
    before), or None when it is free."""
    from ..models import store

    m = store.entries().get(model_id)
    if m is None:
        return None
    return "embedded" if m.get("embedded") else "imported" if m.get("imported") else "registry"


def check_free(model_id: str, replace: bool = False) -> None:
    """InputError when ``model_id`` is taken (a model trained or imported before only unless ``replace``)."""
    origin = model_origin(model_id)
    if origin in ("embedded", "registry"):
        where = "embedded in CLIPSeg" if origin == "embedded" else "in the model registry"
        raise InputError(f"the name {model_id!r} is taken by a model {where}; give the new model another name")
    if origin == "imported" and not replace:
        raise InputError(f"a model named {model_id!r} was trained or imported before; give the new model another "
                         f"name, or replace that one (replace=True; the panel asks first)")


def default_model_id(phrases: list[str]) -> str:
    """``finetuned-<phrases>`` (e.g. ``finetuned-white-matter-grey-matter``), with ``-2``, ``-3``... if taken."""
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(phrases).lower()).strip("-")[:60].strip("-")
    base = f"finetuned-{slug}" if slug else "finetuned"
    model_id, n = base, 1
    while model_origin(model_id) is not None:
        n += 1
        model_id = f"{base}-{n}"
    return model_id


def is_a(node, mrml_class: str) -> bool:
    return hasattr(node, "IsA") and bool(node.IsA(mrml_class))


def check_pairs(pairs) -> list[tuple]:
    """(volume node, segmentation node) pairs, each once; a single pair may be given alone. InputError for none, a
    non-pair, a non-segmentation, nodes in different scenes, a node under a transform."""
    if isinstance(pairs, tuple) and len(pairs) == 2 and not isinstance(pairs[0], (tuple, list)):
        pairs = [pairs]
    pairs = list(pairs or [])
    if not pairs:
        raise InputError("no training pair: give at least one (volume, segmentation) pair whose segments you painted "
                         "on a few slices of that volume")
    out = []
    for n, pair in enumerate(pairs, 1):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InputError(f"training pair {n} is {pair!r}, not a (volume node, segmentation node) pair")
        volume, segmentation = pair
        if not is_a(volume, "vtkMRMLScalarVolumeNode"):
            raise InputError(f"training pair {n} has no scalar volume ({volume!r}); pick the grey-level volume the "
                             f"segments were painted on")
        if not is_a(segmentation, "vtkMRMLSegmentationNode"):
            raise InputError(f"training pair {n} has no segmentation node ({segmentation!r}) for volume "
                             f"{volume.GetName()!r}; pick the segmentation you painted on it")
        if volume.GetScene() is None or segmentation.GetScene() is not volume.GetScene():
            raise InputError(f"volume {volume.GetName()!r} and segmentation {segmentation.GetName()!r} are not in the "
                             f"same scene; load both into one scene")
        check_untransformed(volume, "volume")
        check_untransformed(segmentation, "segmentation")
        if (volume, segmentation) not in out:
            out.append((volume, segmentation))
    return out


def segment_masks(segmentation_node, volume_node, spelling: dict | None = None) -> dict[str, np.ndarray]:
    """Phrase -> bool mask ``[K,J,I]`` on the volume's grid, one per segment name (see the module docstring).
    ``spelling`` (lower-case phrase -> the spelling used), shared across nodes, keeps one spelling per phrase."""
    segmentation = segmentation_node.GetSegmentation()
    masks: dict[str, np.ndarray] = {}
    spelling = {} if spelling is None else spelling
    for i in range(segmentation.GetNumberOfSegments()):
        name = segmentation.GetNthSegment(i).GetName() or ""
        if not name.strip():
            raise InputError(f"segment {i + 1} of {segmentation_node.GetName()!r} has no name; name it with the words "
                             f"of the finding (e.g. 'white matter') in the Segment Editor: the name is the phrase the "
                             f"model learns")
        phrase = check_prompts([name])[0]
        phrase = spelling.setdefault(phrase.lower(), phrase)
        mask = segment_to_array(segmentation_node, segmentation.GetNthSegmentID(i), volume_node)
        masks[phrase] = masks[phrase] | mask if phrase in masks else mask
    return masks


def labelled_slices(masks) -> list[int]:
    """The K indices (first array axis) on which any of ``masks`` holds a voxel."""
    painted = np.zeros(0, bool)
    for mask in masks:
        any_k = np.asarray(mask).reshape(len(mask), -1).any(axis=1)
        painted = any_k if painted.size == 0 else painted | any_k
    return [int(k) for k in np.flatnonzero(painted)]


class TrainRun(BackgroundJob):
    """Fine-tune ``from_model`` (a catalogue id or spec path; default: the command's, the default model) on the
    painted slices of ``pairs`` into a new model ``model_id`` (default: ``default_model_id`` of the phrases).
    ``options``: ``TRAIN_OPTIONS`` (device, precision, steps, force, replace, inputSize), checked here. ``start()``
    exports and starts; ``poll``, ``cancel``; ``finish()`` imports the model and returns its id."""

    def __init__(self, pairs, from_model=None, model_id: str | None = None, *, python: str | None = None,
                 **options):
        super().__init__(python)
        self.pairs = check_pairs(pairs)
        self.from_model = str(from_model) if from_model not in (None, "") else None
        self.model_id = check_model_id(model_id) if model_id not in (None, "") else None
        self.options = train_options(**options)
        self.table: list[dict] = []  # the rows of data.csv, once started
        self.labelled: list[tuple[str, str, list[int]]] = []  # (volume, segmentation, its labelled K slices)

    @property
    def phrases(self) -> list[str]:
        return list(dict.fromkeys(row["phrase"] for row in self.table))

    def start(self) -> "TrainRun":
        """Check the pairs, export them, start ``clipseg finetune``. Raises InputError on bad input."""
        if self.model_id is not None:
            check_free(self.model_id, self.options["replace"])
        return self._launch(self._prepare, self.options["device"])

    def _prepare(self, folder: Path) -> list[str]:
        self.table = self._export(folder)
        if self.model_id is None:
            self.model_id = default_model_id(self.phrases)
        return finetune_command(folder / "data.csv", folder / "model", self.model_id, self.from_model,
                                device=self.options["device"], precision=self.options["precision"],
                                steps=self.options["steps"],
                                force=self.options["force"], python=self.python,
                                input_size=self.options["inputSize"])

    def _export(self, folder: Path) -> list[dict]:
        """Write the volumes, masks and ``data.csv`` (absolute paths, UTF-8) into ``folder``; returns the rows."""
        rows, volumes, painted, spelling = [], {}, {}, {}
        self.labelled = []
        for n, (volume, segmentation) in enumerate(self.pairs, 1):
            if volume.GetID() not in volumes:
                array, geometry = volume_to_array(volume)
                volumes[volume.GetID()] = (write_volume(folder / f"volume-{len(volumes) + 1}.nrrd", array, geometry),
                                           geometry)
            image, geometry = volumes[volume.GetID()]
            masks = segment_masks(segmentation, volume, spelling)
            slices = labelled_slices(masks.values())
            if not slices:
                raise InputError(f"segmentation {segmentation.GetName()!r} has no painted voxel on volume "
                                 f"{volume.GetName()!r}: paint each structure on a few slices of that volume "
                                 f"(Segment Editor), then train again")
            self.labelled.append((volume.GetName(), segmentation.GetName(), slices))
            for m, (phrase, mask) in enumerate(masks.items(), 1):
                path = write_volume(folder / f"mask-{n}-{m}.nrrd", mask.astype(np.uint8), geometry)
                painted[phrase] = painted.get(phrase, False) or bool(mask.any())
                rows.append({"image": str(image), "mask": str(path), "phrase": phrase,
                             "slices": ";".join(map(str, slices))})
        for phrase in [p for p, any_voxel in painted.items() if not any_voxel]:
            self.notes.append(f"segment {phrase!r} is empty on every painted slice; it was left out of the training")
        rows = [row for row in rows if painted[row["phrase"]]]
        with open(folder / "data.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, DATA_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        return rows

    def describe(self) -> str:
        """One line for the status: what is trained on what (after ``start``)."""
        slices = sum(len(s) for _, _, s in self.labelled)
        return (f"Training {self.model_id} from {self.from_model or f'the default model ({DEFAULT_MODEL})'} on "
                f"{', '.join(self.phrases)}: {slices} painted slice(s) in {len(self.labelled)} segmentation(s)")

    def _result(self) -> str:
        """Import the written model into the catalogue; its id."""
        from ..models import read_spec, store

        done = self.run.state.result or {}
        spec_path = Path(done.get("model") or self.tmp / "model" / f"{self.model_id}.json")
        if not spec_path.is_file():
            raise ClipSegError(f"the fine-tuning finished but its model spec {spec_path} is missing; run it again")
        written = read_spec(spec_path)["id"]
        if written != self.model_id:
            raise ClipSegError(f"the fine-tuning wrote the model {written!r}, not the {self.model_id!r} asked for")
        check_free(self.model_id, self.options["replace"])
        if model_origin(self.model_id) == "imported":
            store.remove(self.model_id)
        return store.import_spec(spec_path).name
