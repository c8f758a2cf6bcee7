"""One segmentation run on a volume node, for the Slicer panel and console (no Qt needed).

``SceneRun`` validates the inputs, writes the volume to a temporary NRRD, starts ``clipseg segment`` in a background
process (``background.BackgroundRun``), and when it has finished loads the ``.seg.nrrd`` into a segmentation node
with the MRML bridge: one segment per prompt, the input as reference geometry, the user's other segments untouched,
the node placed under the input's study in the subject hierarchy. Cancelling kills the process tree and removes the
temporary files; nothing is written into the scene unless the run succeeded.
"""

from __future__ import annotations

import json
from pathlib import Path

from .background import BackgroundJob, segment_command
from ..checks import check_prompts
from ..errors import InputError
from ..io.outputs import read_probabilities, read_segment_masks, write_volume
from .mrml_bridge import masks_to_segmentation, volume_to_array
from ..options import SegmentOptions

# The decision's inputs and outcome stored on each segment (tag CLIPSeg.Decision, JSON), from the run's findings
DECISION_KEYS = ("status", "rule", "required", "evidence", "rejected", "closest_miss", "kept_to_side",
                 "flip_average", "grow_threshold", "grown_voxels")


class SceneRun(BackgroundJob):
    """``options`` (a ``SegmentOptions``; default: all defaults) with ``keywords`` changed (any of its fields, by
    name or Slicer Logic name: ``device="cpu"``, ``keep_probabilities=True``) say how to segment; they are checked
    here, before anything starts (InputError). ``poll``, ``finish`` (-> the segmentation node), ``cancel``: see
    ``background.BackgroundJob``."""

    def __init__(self, volume_node, prompts, segmentation_node=None, *, options: SegmentOptions | None = None,
                 python: str | None = None, **keywords):
        super().__init__(python)
        self.volume_node = volume_node
        self.prompts = check_prompts(prompts)
        self.segmentation_node = segmentation_node
        self.options = SegmentOptions.from_keywords(options, **keywords)
        self.probability_nodes: list = []

    def start(self) -> "SceneRun":
        """Validate, export the volume, start the background process. Raises InputError on bad input."""
        volume, geometry = volume_to_array(self.volume_node)
        if self.segmentation_node is not None and self.segmentation_node.GetScene() is not \
                self.volume_node.GetScene():
            raise InputError("the output segmentation is not in the same scene as the volume; pick another output")

        def prepare(folder: Path) -> list[str]:
            write_volume(folder / "input.nrrd", volume, geometry)
            probs = folder / "probabilities.nrrd" if self.options.keep_probabilities else None
            return segment_command(folder / "input.nrrd", self.prompts, folder / "output.seg.nrrd", self.options,
                                   probabilities=probs, python=self.python)

        return self._launch(prepare, self.options.device)

    def _result(self):
        return self._load(self.tmp / "output.seg.nrrd")

    def _load(self, seg_path: Path):
        """Read every output file first, so an unreadable one leaves the scene as it was."""
        masks = read_segment_masks(seg_path, self.prompts)
        probabilities = read_probabilities(self.tmp / "probabilities.nrrd", len(self.prompts)) \
            if self.options.keep_probabilities else None
        scene = self.volume_node.GetScene()
        node = self.segmentation_node
        if node is None or node.GetScene() is None:
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{self.volume_node.GetName()} CLIPSeg")
            node.CreateDefaultDisplayNodes()
        source = node.GetSegmentation().GetSourceRepresentationName()
        ids = masks_to_segmentation(node, self.volume_node, masks)
        self._tag_decisions(node, ids)
        if node.GetSegmentation().GetSourceRepresentationName() != source:
            self.notes.append(f"the segments of {node.GetName()!r} were {source.lower()}s; they were converted to "
                              f"binary labelmap (on the input volume's grid) to add the new segments")
        place_beside(node, self.volume_node)
        self.segmentation_node = node
        if probabilities is not None:
            self._load_probabilities(probabilities)
        return node

    def _tag_decisions(self, node, ids: dict) -> None:
        """Each segment carries its run's decision as segment tags: ``CLIPSeg.Status`` (found, uncertain,
        not found), ``CLIPSeg.Interpretation`` (how the prompt was read), ``CLIPSeg.OutOfDomain`` (true when the
        image did not look like the model's training data) and ``CLIPSeg.Decision`` (JSON: what the rule asked,
        ``required``, and the inputs it judged, ``evidence``: peak and mean probability, extent, area, contrast, shadow
        of the kept regions or of the nearest miss; ``postprocess.decide``; ``kept_to_side``: the side a one-sided
        prompt was kept to, ``inference.laterality``), from the background run's ``done`` event."""
        done = (self.run.state.result or {}) if self.run else {}
        by_prompt = {f.get("prompt"): f for f in done.get("findings") or []}
        segmentation = node.GetSegmentation()
        for prompt, seg_id in ids.items():
            finding = by_prompt.get(prompt)
            if finding is None:
                continue
            segment = segmentation.GetSegment(seg_id)
            segment.SetTag("CLIPSeg.Status", str(finding.get("status")))
            segment.SetTag("CLIPSeg.Interpretation", str(finding.get("interpretation", "")))
            segment.SetTag("CLIPSeg.OutOfDomain", "true" if finding.get("out_of_domain") else "false")
            segment.SetTag("CLIPSeg.Decision", json.dumps({k: finding.get(k) for k in DECISION_KEYS}))

    def _load_probabilities(self, probabilities):
        """One scalar volume per prompt (probability in [0,1]) on the input's grid, beside it in the hierarchy."""
        from .mrml_bridge import array_to_volume_node, show_as_probability

        for prompt, p in zip(self.prompts, probabilities):
            node = array_to_volume_node(self.volume_node.GetScene(), p, self.volume_node,
                                        f"{self.volume_node.GetName()} p({prompt})")
            show_as_probability(node)
            place_beside(node, self.volume_node)
            self.probability_nodes.append(node)


def place_beside(node, volume_node) -> None:
    """Put ``node`` under the same parent (study) as ``volume_node`` in the subject hierarchy, when there is one."""
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volume_node.GetScene())
    if sh is None:
        return
    vol_item = sh.GetItemByDataNode(volume_node)
    if not vol_item:
        return
    parent = sh.GetItemParent(vol_item)
    if not parent or parent == sh.GetSceneItemID():
        return
    seg_item = sh.GetItemByDataNode(node)
    if seg_item:
        sh.SetItemParent(seg_item, parent)
    else:  # outside the app no plugin creates items for new nodes
        sh.CreateItem(parent, node)
