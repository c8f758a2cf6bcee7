"""Finding names in any script survive every output: .seg.nrrd, label table, JSON events, Slicer nodes."""

import json
import unicodedata

import numpy as np
import pytest
import slicerio

from CLIPSegLib.cli import main
from CLIPSegLib.engines.clip_backbone import check_prompts
from CLIPSegLib.io.geometry import Geometry
from CLIPSegLib.io.outputs import (label_names_path, read_label_names, read_segment_masks, read_segmentation,
                                   write_segmentation, write_volume)

from conftest import assert_no_partial_files

NAMES = ["nódulo tiroideo", "甲状腺结节", "🫁 pulmón", 'a "quoted" | b: c=d & e%20']


def run(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr()


@pytest.fixture
def small_volume(tmp_path):
    from CLIPSegLib.synthetic.phantoms import make_phantom

    ph = make_phantom((3, 32, 32), spacing=(1.5, 0.7, 0.6), seed=3, findings=("nodule",))
    return write_volume(tmp_path / "in.nrrd", ph.image, Geometry.axis_aligned(ph.spacing))


def test_non_ascii_findings_round_trip_through_seg_nrrd_label_table_and_json(small_volume, tiny_model, tmp_path,
                                                                               capsys):
    prompts = sum((["--prompt", n] for n in NAMES), [])
    seg_path, label_path = tmp_path / "out.seg.nrrd", tmp_path / "labels.nii.gz"
    for out in (seg_path, label_path):
        code, io = run(["segment", small_volume, *prompts, "--output", out, "--model", tiny_model, "--device", "cpu",
                        "--progress", "json"], capsys)
        assert code == 0, io.err
        events = [json.loads(line) for line in io.out.splitlines()]  # strict JSON, one object per line
        assert list(events[-1]["found"]) == NAMES
        assert [e["text"].split("':")[0][1:] for e in events if e["event"] == "message"] == NAMES
    seg = read_segmentation(seg_path)
    assert [s["name"] for s in seg["segments"]] == NAMES
    masks = read_segment_masks(seg_path, NAMES)
    assert list(masks) == NAMES and all(m.shape == (3, 32, 32) for m in masks.values())
    # plain slicerio reads the file (its NRRD reader drops non-ASCII characters from names, hence read_segmentation)
    assert len(slicerio.read_segmentation(str(seg_path))["segments"]) == len(NAMES)
    assert read_label_names(label_path) == {n + 1: name for n, name in enumerate(NAMES)}
    assert label_names_path(label_path) == tmp_path / "labels.labels.csv"
    assert_no_partial_files(tmp_path)


def _random_prompt(rng) -> str:
    """Text from many scripts and planes: ASCII punctuation that means something in NRRD/CSV/Slicer tags, Latin,
    combining marks, CJK, right-to-left, astral emoji with joiners, and assorted spaces and line breaks (the last
    two are collapsed by check_prompts)."""
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x590, 0x6FF), (0x900, 0x97F),
              (0x3000, 0x303F), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF)]
    specials = list("\"'|:=&%;,\\#~^") + ["\u200d", "\u00a0", "\u2003", "\n", "\t", "\r\n", "\u2028", "\ufe0f"]
    chars = []
    for _ in range(int(rng.integers(1, 16))):
        if rng.random() < 0.3:
            chars.append(specials[int(rng.integers(len(specials)))])
            continue
        lo, hi = blocks[int(rng.integers(len(blocks)))]
        c = chr(int(rng.integers(lo, hi + 1)))
        if unicodedata.category(c) not in ("Cc", "Cs", "Cn"):
            chars.append(c)
    text = "".join(chars)
    return text if text.strip() else "x" + text


def test_random_unicode_finding_names_come_back_from_seg_nrrd(tiny_model, tmp_path):
    """Property test (seeded): random finding text -> segment -> .seg.nrrd -> slicerio (+ UTF-8 names) -> the
    same names, in order."""
    from CLIPSegLib.inference.segment_file import load_engine, segment_file

    engine = load_engine(str(tiny_model), device="cpu")
    volume = np.random.default_rng(1).random((2, 24, 24)).astype(np.float32)
    source = write_volume(tmp_path / "in.nrrd", volume, Geometry.axis_aligned((1.0, 0.5, 0.5)))
    rng = np.random.default_rng(20240515)
    for run_number in range(12):
        prompts = []
        while len(prompts) < 4:
            p = _random_prompt(rng)
            if " ".join(p.split()).lower() not in [" ".join(q.split()).lower() for q in prompts]:
                prompts.append(p)
        expected = check_prompts(prompts)
        out = tmp_path / f"r{run_number}.seg.nrrd"
        segment_file(source, prompts, out, engine_instance=engine)
        got = [s["name"] for s in read_segmentation(out)["segments"]]
        assert got == expected, (prompts, got)
        assert list(read_segment_masks(out, expected)) == expected


@pytest.mark.parametrize("prompt", ["bad\x00name", "\x1b[31mred", "surrogate \udcff"])
def test_control_characters_and_undecodable_bytes_are_refused(small_volume, tiny_model, tmp_path, capsys, prompt):
    out = tmp_path / "out.seg.nrrd"
    code, io = run(["segment", small_volume, "--prompt", prompt, "--output", out, "--model", tiny_model,
                    "--device", "cpu", "--progress", "none"], capsys)
    assert code == 2 and "control or undecodable characters" in io.err and not out.exists()


def test_slicer_reads_the_names_we_write_and_keeps_unicode_segment_names(tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core is installed by `make test`")
    from CLIPSegLib.slicer.mrml_bridge import ensure_segmentation_support, masks_to_segmentation

    geometry = Geometry.axis_aligned((1.5, 0.7, 0.6))
    mask = np.zeros((3, 4, 5), bool)
    mask[1, 1:3, 1:4] = True
    masks = {name: mask for name in NAMES}
    write_segmentation(tmp_path / "out.seg.nrrd", masks, geometry)
    write_segmentation(tmp_path / "out.nii.gz", masks, geometry)

    scene = slicer.vtkMRMLScene()
    ensure_segmentation_support(scene)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "out.seg.nrrd"))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == NAMES

    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode")
    storage = scene.AddNewNodeByClass("vtkMRMLColorTableStorageNode")
    storage.SetFileName(str(label_names_path(tmp_path / "out.nii.gz")))
    assert storage.ReadData(colors)
    # Slicer's CSV reader (VTK) cannot read a double quote inside a value: that name alone comes back empty
    assert [colors.GetColorName(i + 1) for i in range(3)] == NAMES[:3]

    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    slicer.util.updateVolumeFromArray(volume, np.zeros((3, 4, 5), np.float32))
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ids = masks_to_segmentation(target, volume, masks)
    assert [target.GetSegmentation().GetSegment(ids[n]).GetName() for n in NAMES] == NAMES
