"""One segmentation run on a volume node, for the Slicer panel and console (no Qt needed).

``SceneRun`` validates the inputs, writes the volume to a temporary NRRD, starts ``clipseg segment`` in a background
process (``background.BackgroundRun``), and when it has finished loads the ``.seg.nrrd`` into a segmentation node
with the MRML bridge: one segment per prompt, the input as reference geometry, the user's other segments untouched,
the node placed under the input's study in the subject hierarchy. Cancelling kills the process tree and removes the
temporary files; nothing is written into the scene unless the run succeeded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .background import BackgroundRun, segment_command
from ..checks import check_prompts
from ..errors import Cancelled, ClipSegError, InputError
from ..io.outputs import read_probabilities, read_segment_masks, write_volume
from .mrml_bridge import masks_to_segmentation, volume_to_array
from ..options import SegmentOptions

LIB_PARENT = str(Path(__file__).resolve().parents[2])  # the folder holding CLIPSegLib/


def child_environment(device: str = "auto") -> dict:
    """Environment for the child: CLIPSegLib importable; CPU-only hides GPUs entirely."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([LIB_PARENT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    return env


class SceneRun:
    """``options`` (a ``SegmentOptions``; default: all defaults) with ``keywords`` changed (any of its fields, by
    name or Slicer Logic name: ``device="cpu"``, ``keep_probabilities=True``) say how to segment; they are checked
    here, before anything starts (InputError)."""

    def __init__(self, volume_node, prompts, segmentation_node=None, *, options: SegmentOptions | None = None,
                 python: str | None = None, **keywords):
        self.volume_node = volume_node
        self.prompts = check_prompts(prompts)
        self.segmentation_node = segmentation_node
        self.options = SegmentOptions.from_keywords(options, **keywords)
        self.python = python
        self.run: BackgroundRun | None = None
        self.tmp: Path | None = None
        self.probability_nodes: list = []
        self.notes: list[str] = []  # what the scene side did that the user should know

    def start(self) -> "SceneRun":
        """Validate, export the volume, start the background process. Raises InputError on bad input."""
        volume, geometry = volume_to_array(self.volume_node)
        if self.segmentation_node is not None and self.segmentation_node.GetScene() is not \
                self.volume_node.GetScene():
            raise InputError("the output segmentation is not in the same scene as the volume; pick another output")
        self.tmp = Path(tempfile.mkdtemp(prefix="clipseg-"))
        try:
            write_volume(self.tmp / "input.nrrd", volume, geometry)
            probs = self.tmp / "probabilities.nrrd" if self.options.keep_probabilities else None
            argv = segment_command(self.tmp / "input.nrrd", self.prompts, self.tmp / "output.seg.nrrd", self.options,
                                   probabilities=probs, python=self.python)
            self.run = BackgroundRun(argv, env=child_environment(self.options.device))
        except BaseException:
            self.cleanup()
            raise
        return self

    @property
    def running(self) -> bool:
        return self.run is not None and self.run.returncode is None

    def poll(self) -> list[dict]:
        return self.run.poll() if self.run else []

    def cancel(self) -> None:
        if self.run is not None:
            self.run.cancel()
        self.cleanup()

    def finish(self, timeout: float | None = None):
        """Wait for the process, then load its result. Returns the segmentation node; raises ClipSegError with the
        CLI's own message when it failed. If ``timeout`` (s) passes first, ``subprocess.TimeoutExpired`` is raised
        and the run goes on with its files intact: call ``finish`` again, or ``cancel``."""
        code = self.run.wait(timeout)
        try:
            if self.run.cancelled:
                raise Cancelled("cancelled; the scene was not changed")
            if code != 0:
                raise ClipSegError(self.run.error_text())
            return self._load(self.tmp / "output.seg.nrrd")
        finally:
            self.cleanup()

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
        not found), ``CLIPSeg.Interpretation`` (how the prompt was read) and ``CLIPSeg.OutOfDomain`` (true when the
        image did not look like the model's training data), from the background run's ``done`` event."""
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

    def _load_probabilities(self, probabilities):
        """One scalar volume per prompt (probability in [0,1]) on the input's grid, beside it in the hierarchy."""
        from .mrml_bridge import array_to_volume_node, show_as_probability

        for prompt, p in zip(self.prompts, probabilities):
            node = array_to_volume_node(self.volume_node.GetScene(), p, self.volume_node,
                                        f"{self.volume_node.GetName()} p({prompt})")
            show_as_probability(node)
            place_beside(node, self.volume_node)
            self.probability_nodes.append(node)

    @property
    def messages(self) -> list[str]:
        return (self.run.state.messages if self.run else []) + self.notes

    def cleanup(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


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
