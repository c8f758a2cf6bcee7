"""MedCLIP-SAM training: boxes from masks (jitter, negatives), a tiny SAM learning box -> mask through the one loop
(loss goes down, resumable checkpoint), the calibration's slice floors acting on the maps, and the CLI refusing
cliptnseg-only options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from CLIPSegLib.errors import InputError
from CLIPSegLib.training.medclipsam_recipe import box_of, negative_box, train_sam

TINY_SAM = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1], "image_size": 32,
            "patch_size": 8, "prompt_dim": 32, "window_size": 4, "mlp_dim": 64, "decoder_heads": 2}


def test_a_box_is_the_masks_bounds_moved_by_at_most_the_jitter():
    mask = torch.zeros(32, 32)
    mask[10:20, 4:8] = 1  # rows 10..19, columns 4..7
    assert box_of(mask, 0.0).tolist() == [4.0, 10.0, 7.0, 19.0]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x0, y0, x1, y1 = box_of(mask, 0.25, g).tolist()
        assert abs(x0 - 4) <= 1 and abs(x1 - 7) <= 1 and abs(y0 - 10) <= 2.5 and abs(y1 - 19) <= 2.5
        assert 0 <= x0 <= x1 <= 31 and 0 <= y0 <= y1 <= 31
    with pytest.raises(InputError, match="the mask is empty"):
        box_of(torch.zeros(8, 8), 0.1)


def test_a_negative_box_touches_no_finding():
    masks = torch.zeros(2, 64, 64)
    masks[0, 10:30, 10:30] = 1
    masks[1, 40:50, 5:60] = 1
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        box = negative_box(masks, g)
        if box is None:
            continue
        x0, y0, x1, y1 = box.long().tolist()
        assert not masks[:, y0:y1 + 1, x0:x1 + 1].any()
    assert negative_box(torch.ones(1, 64, 64), g) is None


class Squares(torch.utils.data.Dataset):
    """A bright square on noise, its mask: what a box around it should give."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        r = np.random.default_rng(i)
        img = torch.from_numpy(r.uniform(0, 0.3, (1, 32, 32)).astype(np.float32))
        y, x, s = int(r.integers(2, 16)), int(r.integers(2, 16)), int(r.integers(6, 14))
        mask = torch.zeros(1, 32, 32)
        mask[0, y:y + s, x:x + s] = 1
        img[0, y:y + s, x:x + s] += 0.6
        return img, ["square"], mask


def test_a_tiny_sam_learns_box_to_mask_through_the_loop_and_resumes(tmp_path):
    from CLIPSegLib.engines.medclipsam.sam import build_sam, sam_sizes

    torch.manual_seed(0)
    sam = build_sam(sam_sizes(TINY_SAM))
    ckpt = tmp_path / "sam.pt"
    losses = train_sam(sam, Squares(), 40, ckpt, batch_size=4, lr=3e-3, stop_after=30)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    more = train_sam(sam, Squares(), 40, ckpt, batch_size=4, lr=3e-3)
    assert len(more) == 10  # resumed at step 30 of 40
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 40 and set(saved["model"]) == set(sam.state_dict())


def test_the_calibration_floors_empty_the_slices_they_should():
    from CLIPSegLib.training.calibration import CalibrationCase
    from CLIPSegLib.training.medclipsam_calibration import entries_for

    truth = np.zeros((4, 8, 8), bool)
    truth[1:3, 2:6, 2:6] = True
    masks = np.zeros((1, 4, 8, 8), np.float32)
    masks[0, 1:4, 2:6, 2:6] = 0.9  # slice 3 is a false extension
    presence = np.array([[0.1, 0.9, 0.9, 0.2]], np.float32)
    iou = np.array([[0.0, 0.8, 0.8, 0.9]], np.float32)
    case = CalibrationCase(np.zeros((4, 8, 8)), (1.0, 1.0, 1.0), {"nodule": truth}, {"nodule": "nodule"})
    (_, _, comps, *_), = entries_for([(case, masks, presence, iou)], floor=0.0, min_iou=0.0, vote=1)
    assert sum(c.voxels for c, _ in comps) == 48
    (_, _, comps, *_), = entries_for([(case, masks, presence, iou)], floor=0.5, min_iou=0.0, vote=1)
    assert sum(c.voxels for c, _ in comps) == 32  # slice 3 under the presence floor
    (_, _, comps, *_), = entries_for([(case, masks, presence, iou)], floor=0.0, min_iou=0.85, vote=1)
    assert sum(c.voxels for c, _ in comps) == 16  # only slice 3's box passes SAM's IoU floor


def test_train_medclipsam_refuses_cliptnseg_options_and_unknown_stages(tmp_path, capsys):
    from CLIPSegLib.cli import main

    code = main(["train", "--engine", "medclipsam", "--output-dir", str(tmp_path), "--data", "x.csv",
                 "--progress", "none"])
    assert code == 2 and "--engine medclipsam trains on phantoms only" in capsys.readouterr().err
    code = main(["train", "--engine", "medclipsam", "--output-dir", str(tmp_path), "--stages", "clip,export",
                 "--progress", "none"])
    assert code == 2 and "the medclipsam stages are sam,calibrate,export" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_sam_recipe_keeps_a_medclipsam_clip_sources_saliency(tiny_medclipsam, tiny_model, tmp_path):
    """A CLIP from a medclipsam model (e.g. made by finetune-clip) keeps its saliency settings (over the gradcam
    default); a cliptnseg model's CLIP gets gradcam."""
    import json
    import shutil

    from CLIPSegLib.training.medclipsam_recipe import embedded_spec

    spec = json.loads(tiny_medclipsam.read_text())
    for f in spec["files"]:
        shutil.copy(tiny_medclipsam.parent / f["name"], tmp_path)
    spec["saliency"] = {"method": "patch_similarity", "slice_presence": "patches"}
    tuned = tmp_path / "tuned-saliency.json"
    tuned.write_text(json.dumps(spec))
    made = embedded_spec("x", str(tuned))
    assert made["saliency"] == {"method": "patch_similarity", "slice_presence": "patches", "occlusion": True}
    assert made["boxes"]["max_boxes"] == 3  # the occlusion choice keeps one of a prompt's three boxes
    spec.pop("saliency")
    tuned.write_text(json.dumps(spec))
    assert embedded_spec("x", str(tuned))["saliency"] == {"method": "gradcam", "occlusion": True}
    assert embedded_spec("x", str(tiny_model))["saliency"] == {"method": "gradcam", "occlusion": True}


def test_the_sam_recipe_lists_a_clip_beside_it_and_copies_one_from_another_folder(tiny_model, tmp_path):
    """The exported model hashes the CLIP it runs: the clip_from model's file when it lies in the output folder, else
    its tensors copied in (no absolute path into another folder, e.g. build/ from the embedded models)."""
    import shutil

    from CLIPSegLib.models import load_spec, load_weights
    from CLIPSegLib.training.medclipsam_recipe import embedded_spec, write_with_clip

    sam = {"sam.w": torch.ones(3)}
    elsewhere = write_with_clip(embedded_spec("far", str(tiny_model)), dict(sam), load_spec(tiny_model),
                                tmp_path / "far")
    far = load_spec(elsewhere)
    assert [f["name"] for f in far["files"]] == ["far.safetensors"]
    clip = {k: v for k, v in load_weights(load_spec(tiny_model)).items() if k.startswith("clip.")}
    state = load_weights(far)
    assert clip and all(torch.allclose(state[k], v.half().float()) for k, v in clip.items())
    beside = tmp_path / "beside"
    beside.mkdir()
    for f in load_spec(tiny_model)["files"]:
        shutil.copy(tiny_model.parent / f["name"], beside)
    shutil.copy(tiny_model, beside)
    near = load_spec(write_with_clip(embedded_spec("near", str(beside / tiny_model.name)), dict(sam),
                                     load_spec(beside / tiny_model.name), beside))
    listed = [f["name"] for f in load_spec(tiny_model)["files"]]
    assert [f["name"] for f in near["files"]] == ["near.safetensors"] + listed
    assert not any(k.startswith("clip.") for k in load_weights({**near, "files": near["files"][:1]}))
