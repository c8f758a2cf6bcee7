import pytest
import torch

from CLIPSegLib.training.datasets import PhantomBank
from CLIPSegLib.engines.cliptnseg.network import build_network
from CLIPSegLib.errors import InputError
from CLIPSegLib.training.cliptnseg_recipe import train_clip, train_segmenter

from conftest import TINY_SPEC


def test_segmenter_trains_checkpoints_and_resumes(tmp_path):
    torch.manual_seed(0)
    bank = PhantomBank(8, 32, n_prompts=2)
    net = build_network(TINY_SPEC)
    ckpt = tmp_path / "seg.pt"
    before = {k: v.clone() for k, v in net.trainable_state_dict().items()}
    first = train_segmenter(net, bank, steps=6, ckpt=ckpt, batch_size=4, stop_after=3)
    assert len(first) == 3 and ckpt.is_file()
    assert torch.load(ckpt, weights_only=True)["step"] == 3
    assert any(not torch.equal(before[k], v) for k, v in net.trainable_state_dict().items())
    fresh = build_network(TINY_SPEC)
    rest = train_segmenter(fresh, bank, steps=6, ckpt=ckpt, batch_size=4)
    assert len(rest) == 3  # resumed at step 3 of 6
    assert torch.load(ckpt, weights_only=True)["step"] == 6


def test_clip_contrastive_training_moves_the_loss(tmp_path):
    torch.manual_seed(0)
    bank = PhantomBank(16, 32, n_prompts=3, augment=False)
    net = build_network(TINY_SPEC)
    clip = net.clip
    for p in clip.parameters():
        p.requires_grad_(True)
    before = clip.visual.conv1.weight.clone()
    train_clip(clip, bank, steps=3, ckpt=tmp_path / "clip.pt", batch_size=8)
    assert not torch.equal(before, clip.visual.conv1.weight)
    assert torch.load(tmp_path / "clip.pt", weights_only=True)["step"] == 3


def test_bank_adds_every_slice_of_the_volume_phantoms_with_their_masks():
    import numpy as np

    from CLIPSegLib.training.datasets import TRAIN_VOLUME_SEED_BASE
    from CLIPSegLib.synthetic.phantoms import FINDINGS, random_volume_phantom

    bank = PhantomBank(2, 64, augment=False, volumes=1)
    vol = random_volume_phantom(TRAIN_VOLUME_SEED_BASE)
    assert len(bank) == 2 + vol.image.shape[0] and vol.masks  # the test volume holds a finding
    for j, f in enumerate(FINDINGS):
        truth = vol.masks.get(f, np.zeros(vol.image.shape, bool))
        # a slice holds the finding in the bank iff it does in the volume (64 px from 256 px: only specks vanish)
        in_bank = bank.masks[2:, j].any((1, 2))
        assert (in_bank <= truth.any((1, 2))).all()
        big = truth.sum((1, 2)) >= 64
        assert in_bank[big].all()
    _, phrases, masks = bank[2]
    assert len(phrases) == len(FINDINGS) and masks.shape == (len(FINDINGS), 64, 64)


def test_data_smaller_than_one_batch_is_refused_not_waited_on(tmp_path):
    import pytest

    from CLIPSegLib.errors import InputError

    with pytest.raises(InputError, match="2 samples, fewer than one batch of 4"):
        train_segmenter(build_network(TINY_SPEC), PhantomBank(2, 32, n_prompts=2), steps=1, ckpt=tmp_path / "s.pt",
                        batch_size=4)
    assert not (tmp_path / "s.pt").exists()


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
EMBEDDED = ["CLIPSeg/Resources/Models/cliptnseg-phantom-small.json",
            "CLIPSeg/Resources/Models/cliptnseg-phantom-small.safetensors"]
TINY_RUN = ["--phantoms", "32", "--clip-steps", "1", "--steps", "1", "--calibration-volumes", "1",
            "--device", "cpu", "--progress", "none"]  # argparse keeps the last value: these override the README's


def _readme_train_args() -> list[str]:
    """The arguments of the one `clipseg train` example that makes the default engine's model from scratch (no
    --engine, no --init-from) in README.md's bash blocks (line continuations joined)."""
    import re
    import shlex

    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line, comments=True) for line in lines if re.match(r"\S*clipseg train\b", line)]
    commands = [c for c in commands if "--engine" not in c and "--init-from" not in c]
    assert len(commands) == 1, commands
    return commands[0][1:]


def _copy_embedded(root):
    for rel in EMBEDDED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes((REPO / rel).read_bytes())


def test_readme_train_example_leaves_the_committed_model_alone(tmp_path, monkeypatch, capsys):
    """The README's command, run from a copy of the repository layout with tiny step counts, writes a new model and
    changes neither the committed model nor its copy; run again, it refuses to overwrite what it wrote."""
    import hashlib
    import json

    from CLIPSegLib.cli import main

    before = {rel: hashlib.sha256((REPO / rel).read_bytes()).hexdigest() for rel in EMBEDDED}
    _copy_embedded(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = _readme_train_args()
    assert main(args + TINY_RUN) == 0
    for rel, digest in before.items():
        assert hashlib.sha256((REPO / rel).read_bytes()).hexdigest() == digest
        assert hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest() == digest
    reported = capsys.readouterr().out.split("wrote ")[-1].strip()
    written = tmp_path / reported
    assert written.is_file() and written.parent != tmp_path / "CLIPSeg/Resources/Models"
    command = json.loads(written.read_text(encoding="utf-8"))["training"]["command"]
    assert f"--output-dir {args[args.index('--output-dir') + 1]}" in command and command.endswith("--force")
    stamp = written.stat().st_mtime_ns
    assert main(args + TINY_RUN) == 2  # the model is there now
    err = capsys.readouterr().err
    assert f"{reported} is an existing model" in err and "--force" in err and written.stat().st_mtime_ns == stamp


def test_training_into_a_folder_holding_the_model_id_refuses_before_any_work(tmp_path, monkeypatch, capsys):
    from CLIPSegLib import models
    from CLIPSegLib.cli import build_parser, main
    from CLIPSegLib.training.cliptnseg_recipe import check_output_free

    _copy_embedded(tmp_path)
    shipped = tmp_path / "CLIPSeg/Resources/Models"
    monkeypatch.setattr(models, "MODELS_DIR", shipped)
    work = tmp_path / "work"
    for out_dir in (shipped, tmp_path / "CLIPSeg/Resources/../Resources/Models"):
        assert main(["train", "--output-dir", str(out_dir), "--work-dir", str(work)] + TINY_RUN) == 2
        err = capsys.readouterr().err
        assert "cliptnseg-phantom-small.json is a model shipped with CLIPSeg" in err and "--force" in err
    assert not work.exists()  # refused before anything was built
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "my-model.safetensors").write_bytes(b"x")
    with pytest.raises(InputError, match="my-model.safetensors is an existing model.*--force"):
        check_output_free(tmp_path / "mine", "my-model")
    check_output_free(tmp_path / "mine", "my-model", force=True)
    check_output_free(tmp_path / "mine", "other-model")
    for bad in ("registry", "../x", ".hidden"):
        with pytest.raises(InputError, match="plain name"):
            check_output_free(tmp_path / "mine", bad, force=True)
    assert build_parser().parse_args(["train"]).output_dir == "build/models"


class _Shapes(torch.utils.data.Dataset):
    """A user's own data: images with a bright disc and/or a dark square, labelled by phrases no phantom knows."""

    phrases = ("bright disc", "dark square")

    def __init__(self, n=16, size=32):
        g = torch.Generator().manual_seed(0)
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        self.items = []
        for i in range(n):
            img = 0.5 + 0.05 * torch.randn(size, size, generator=g)
            disc = ((yy - 10) ** 2 + (xx - 10) ** 2 < 25) & (i % 2 == 0)
            square = (yy > 18) & (yy < 28) & (xx > 18) & (xx < 28) & (i % 3 != 0)
            img[disc], img[square] = 1.0, 0.05
            self.items.append((img.clamp(0, 1)[None], torch.stack([disc, square]).float()))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image, masks = self.items[i]
        return image, list(self.phrases), masks


def test_clip_and_segmenter_train_on_phrases_taken_from_the_data(tmp_path):
    """No phantom finding list is needed: the phrases come from the data (each naming its own concept)."""
    torch.manual_seed(0)
    data = _Shapes()
    net = build_network(TINY_SPEC)
    clip = net.clip
    for p in clip.parameters():
        p.requires_grad_(True)
    before = clip.visual.conv1.weight.clone()
    losses = train_clip(clip, data, steps=3, ckpt=tmp_path / "clip.pt", batch_size=8)
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert not torch.equal(before, clip.visual.conv1.weight)
    net.freeze_clip()
    seg = train_segmenter(net, data, steps=4, ckpt=tmp_path / "seg.pt", batch_size=4)
    assert len(seg) == 4 and all(torch.isfinite(torch.tensor(seg)))


def test_training_stops_early_when_validation_stops_improving(tmp_path):
    from CLIPSegLib.progress import Progress

    torch.manual_seed(0)
    net = build_network(TINY_SPEC)
    scores = iter([1.0, 0.9, 0.95, 0.97, 0.99, 0.5])  # best at the 2nd check, then 3 checks without improvement
    messages = []
    progress = Progress("none")
    progress.message = messages.append
    losses = train_segmenter(net, _Shapes(), steps=20, ckpt=tmp_path / "seg.pt", batch_size=4, progress=progress,
                             validate=lambda: next(scores), validate_every=2, patience=3)
    assert len(losses) == 10  # checks at steps 2, 4, 6, 8, 10: stopped after the 5th
    ck = torch.load(tmp_path / "seg.pt", weights_only=True)
    assert ck["step"] == 10 and ck["best"] == pytest.approx(0.9) and ck["stale"] == 3
    assert "stopped early at step 10 of 20" in messages[0]


@pytest.mark.parametrize("args, expected", [
    (["--stages", "clip,segmenterr"], "unknown stage 'segmenterr'"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--calibration-volumes", "0"], "--calibration-volumes 0: must be at least 1"),
    (["--data", "nowhere.csv"], "--data nowhere.csv: no such file"),
    (["--seed", "-1"], None),  # argparse refuses it (exit 2)
    (["--input-size", "200"], "--input-size 200: give a multiple of 32 pixels"),
    (["--slice-vote", "2"], "--slice-vote 2: give an odd number of slices"),
    (["--context-slices", "5"], "--context-slices 5: give 0 (the slice alone) to 3 neighbouring slices"),
    (["--engine", "tgcnet", "--context-slices", "1"], "--context-slices does not apply"),
    (["--engine", "medclipsam", "--context-slices", "1"], "--context-slices does not apply"),
    (["--engine", "tgcnet", "--slice-vote", "3"], "single radiographs, with no neighbouring slices to vote: "
                                                   "--slice-vote does not apply"),
    (["--engine", "tgcnet", "--dataset", "thyroid", "--slice-vote", "4"], "--slice-vote 4: give an odd number"),
    (["--engine", "medclipsam", "--slice-vote", "3"], "--slice-vote does not apply"),
])
def test_train_refuses_bad_arguments_before_any_work(args, expected, tmp_path, capsys, monkeypatch):
    from CLIPSegLib.cli import main
    from CLIPSegLib.training import cliptnseg_recipe

    monkeypatch.setattr(cliptnseg_recipe, "run_training", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["train", "--output-dir", str(tmp_path / "out"), "--progress", "none"] + args)
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    assert code == 2
    if expected:
        assert expected in capsys.readouterr().err


def test_train_passes_the_slice_vote_of_a_thyroid_tgcnet_run_and_records_it(tmp_path, monkeypatch):
    from CLIPSegLib.cli import main
    from CLIPSegLib.training import tgcnet_recipe

    calls = []
    monkeypatch.setattr(tgcnet_recipe, "run_tgcnet_training", lambda *a, **k: calls.append((a, k)))
    assert main(["train", "--engine", "tgcnet", "--dataset", "thyroid", "--slice-vote", "3", "--output-dir",
                 str(tmp_path / "out"), "--work-dir", str(tmp_path / "w"), "--progress", "none"]) == 0
    (args, kwargs), = calls
    assert kwargs["slice_vote"] == 3 and any("--slice-vote 3" in a for a in args if isinstance(a, str))


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_bf16_training_autocasts_the_step_and_keeps_float32_weights(precision, dtype, tmp_path):
    from CLIPSegLib.training.loop import Recipe, run_loop

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    before = layer.weight.detach().clone()
    seen = []

    def loss(batch):
        images, _, masks, _ = batch  # datasets.collate: images [B,1,2,2], masks [B,2,2]
        out = layer(images.flatten(1))
        seen.append(out.dtype)
        return torch.nn.functional.mse_loss(out.float(), masks.flatten(1).mean(1, keepdim=True))

    data = [(torch.randn(1, 2, 2), ["a"], torch.ones(1, 2, 2)) for _ in range(8)]
    recipe = Recipe("toy", [{"params": list(layer.parameters()), "lr": 0.1}], loss, layer.state_dict,
                    layer.load_state_dict, layer.train)
    run_loop(recipe, data, 3, tmp_path / "ck.pt", batch_size=4, precision=precision)
    assert seen == [dtype] * 3
    assert layer.weight.dtype == torch.float32 and not torch.equal(before, layer.weight.detach())
    with pytest.raises(InputError, match="precision 'fp16' is not one of fp32, bf16"):
        run_loop(recipe, data, 3, tmp_path / "other.pt", batch_size=4, precision="fp16")


def test_a_gradient_norm_limit_scales_each_step_down_and_says_how_often(tmp_path):
    from CLIPSegLib.progress import Progress
    from CLIPSegLib.training.loop import Recipe, run_loop

    weight = torch.nn.Parameter(torch.zeros(4))
    data = [(torch.ones(1, 2, 2), ["a"], torch.ones(1, 2, 2)) for _ in range(4)]
    recipe = Recipe("toy", [{"params": [weight], "lr": 0.01}], lambda batch: 1000 * weight.sum(),
                    lambda: {"w": weight.detach().clone()}, lambda s: weight.data.copy_(s["w"]), lambda mode: None)

    def run(ckpt, limit):
        messages, infos = [], []
        progress = Progress("none")
        progress.message = messages.append
        progress.update = lambda stage, done, total, info="": infos.append(info)
        run_loop(recipe, data, 3, tmp_path / ckpt, batch_size=2, max_grad_norm=limit, progress=progress)
        return messages, infos

    messages, infos = run("free.pt", None)
    assert messages == [] and len(infos) == 3 and not any("gradient norm" in info for info in infos)
    assert float(weight.grad.norm()) == pytest.approx(2000)  # the last step's gradient, as backward left it
    messages, infos = run("clipped.pt", 0.5)
    assert float(weight.grad.norm()) == pytest.approx(0.5)
    assert messages == ["toy: the gradient norm was clipped to 0.5 in 3 of the 3 steps run"]
    assert all(info.endswith("gradient norm 2e+03") for info in infos)
    messages, _ = run("loose.pt", 1e4)
    assert float(weight.grad.norm()) == pytest.approx(2000)
    assert messages == ["toy: the gradient norm was clipped to 10000 in 0 of the 3 steps run"]
    assert run("free.pt", None) == ([], [])  # its own settings resume it (nothing left to run)
    with pytest.raises(InputError, match="the checkpoint .* was made by a toy run with other settings"):
        run("free.pt", 0.5)  # not resumed silently under a limit it was not trained with
    with pytest.raises(InputError, match="--max-grad-norm 0: give a finite limit above 0"):
        run("other.pt", 0.0)


def test_under_a_gradient_norm_limit_a_step_with_a_non_finite_gradient_is_skipped(tmp_path):
    """Clipping would scale every gradient by NaN; the step is skipped instead, the weights stay finite, and the
    run says how many were skipped."""
    from CLIPSegLib.progress import Progress
    from CLIPSegLib.training.loop import Recipe, run_loop

    weight = torch.nn.Parameter(torch.ones(3))
    calls = []

    def loss(batch):
        calls.append(1)
        scale = float("nan") if len(calls) == 2 else 1.0
        return (weight * torch.tensor([1.0, 2.0, 3.0])).sum() * scale

    data = [(torch.ones(1, 2, 2), ["a"], torch.ones(1, 2, 2)) for _ in range(4)]
    recipe = Recipe("toy", [{"params": [weight], "lr": 0.01}], loss, lambda: {"w": weight.detach().clone()},
                    lambda s: weight.data.copy_(s["w"]), lambda mode: None)
    messages = []
    progress = Progress("none")
    progress.message = messages.append
    run_loop(recipe, data, 3, tmp_path / "ck.pt", batch_size=2, max_grad_norm=100.0, progress=progress)
    assert torch.isfinite(weight).all() and not torch.equal(weight.detach(), torch.ones(3))
    assert messages == ["toy: the gradient norm was clipped to 100 in 0 of the 3 steps run; 1 step(s) with a "
                        "non-finite gradient were skipped"]


def test_under_bf16_autocast_the_frozen_image_tower_runs_a_bfloat16_copy_kept_out_of_the_state_dict():
    """CPU autocast casts frozen float32 weights again at every op (slower than fp32): a training step under bf16
    runs a bfloat16 copy of the frozen tower, made once; the network's own tower and state dict stay float32."""
    net = build_network(TINY_SPEC)
    x, text = torch.rand(2, 1, net.input_size, net.input_size), torch.randn(1, net.clip.text_projection.shape[1])
    assert net.frozen_visual() is net.clip.visual
    exact, _ = net(x, text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shadow = net.frozen_visual()
        approx, _ = net(x, text)
        assert shadow is net.frozen_visual() and shadow is not net.clip.visual
    assert {p.dtype for p in shadow.parameters()} == {torch.bfloat16}
    assert {v.dtype for k, v in net.state_dict().items() if k.startswith("clip.visual.")} == {torch.float32}
    assert not any("bf16" in k for k in net.state_dict())
    assert float((approx.float() - exact).abs().max()) < 0.1 * float(exact.abs().max())


def test_a_checkpoint_of_other_settings_is_refused_not_resumed(tmp_path):
    net = build_network(TINY_SPEC)
    ckpt = tmp_path / "seg.pt"
    train_segmenter(net, _Shapes(), steps=4, ckpt=ckpt, batch_size=4, stop_after=2)
    with pytest.raises(InputError, match="other settings"):  # a longer schedule would silently reuse the old one
        train_segmenter(build_network(TINY_SPEC), _Shapes(), steps=8, ckpt=ckpt, batch_size=4)
    assert len(train_segmenter(build_network(TINY_SPEC), _Shapes(), steps=4, ckpt=ckpt, batch_size=4)) == 2


def test_train_family_b_draws_its_bank_and_calibration_from_family_b(tmp_path, monkeypatch, capsys):
    """`clipseg train --family B`: the training bank and the calibration volumes are family B phantoms, and the spec
    says so (issue: presence under domain shift, training on the second family)."""
    import json

    from CLIPSegLib.cli import main
    from CLIPSegLib.training import calibration, datasets

    asked = {"bank": [], "calibration": []}
    bank, cases = datasets.PhantomBank, calibration.phantom_cases

    class SpyBank(bank):
        def __init__(self, *args, family="A", **kw):
            asked["bank"].append(family)
            super().__init__(*args, family=family, **kw)

    def spy_cases(n, seed_base=datasets.CALIBRATION_SEED_BASE, family="A"):
        asked["calibration"].append(family)
        return cases(n, seed_base, family)

    monkeypatch.setattr(datasets, "PhantomBank", SpyBank)
    monkeypatch.setattr(calibration, "phantom_cases", spy_cases)
    out = tmp_path / "out"
    assert main(["train", "--output-dir", str(out), "--work-dir", str(tmp_path / "w"), "--model-id", "b-model",
                 "--family", "B", "--max-grad-norm", "2.5", "--progress", "none"] + TINY_RUN) == 0
    spec = json.loads((out / "b-model.json").read_text(encoding="utf-8"))
    assert asked == {"bank": ["B"], "calibration": ["B"]}
    assert spec["training"]["family"] == "B" and "--family B" in spec["training"]["command"]
    assert spec["training"]["max_grad_norm"] == 2.5 and "--max-grad-norm 2.5" in spec["training"]["command"]
    segmenter_run = torch.load(tmp_path / "w" / "segmenter.pt", weights_only=True)  # the loop itself got the limit
    assert json.loads(segmenter_run["fingerprint"])["max_grad_norm"] == 2.5
    assert spec["presence"]["calibration"]["family"] == "B"


def test_init_from_continues_a_model_keeps_its_clip_and_records_the_lineage(tmp_path):
    """`clipseg train --init-from MODEL --stages segmenter,calibrate,export`: the new model's CLIP is the parent's,
    bit for bit; its segmenter starts from the parent's (one step moves it by about the learning rate, while a run
    from random weights lands far away); the spec names the parent and its weights' digest, and its command
    re-creates the run (issue: presence under domain shift, continuing the embedded model on both families)."""
    import json

    from CLIPSegLib.cli import main
    from CLIPSegLib.models import load_spec, load_weights

    out, run = tmp_path / "out", ["--output-dir", str(tmp_path / "out"), "--progress", "none"]
    for model_id in ("parent", "scratch"):
        assert main(["train", "--model-id", model_id, "--work-dir", str(tmp_path / model_id), "--seed",
                     str(len(model_id))] + run + TINY_RUN) == 0
    assert main(["train", "--model-id", "child", "--work-dir", str(tmp_path / "child"), "--init-from",
                 str(out / "parent.json"), "--stages", "segmenter,calibrate,export", "--family", "A+B"]
                + run + TINY_RUN) == 0
    parent, child, scratch = (load_spec(out / f"{m}.json") for m in ("parent", "child", "scratch"))
    wp, wc, ws = (load_weights(s) for s in (parent, child, scratch))
    assert all(torch.equal(wp[k], wc[k]) for k in wp if k.startswith("clip."))
    seg = [k for k in wp if not k.startswith("clip.") and wp[k].is_floating_point()]
    moved = max(float((wc[k] - wp[k]).abs().max()) for k in seg)
    assert moved < 1e-3 < max(float((ws[k] - wp[k]).abs().max()) for k in seg)
    training = child["training"]
    assert training["parent"]["id"] == "parent" and training["clip_steps"] == 0
    assert training["parent"]["weights_sha256"] == {f["name"]: f["sha256"] for f in parent["files"]}
    assert training["parent"]["training"]["seed"] == len("parent")
    assert f"--init-from {out / 'parent.json'} --stages segmenter,calibrate,export" in training["command"]


@pytest.mark.parametrize("args, expected, exit_code", [
    (["--init-from", "tgcnet-report-small"], "is a tgcnet model; --engine cliptnseg continues cliptnseg models only",
     2),
    (["--init-from", "cliptnseg-phantom-small", "--presence-head"], "give --presence-head exactly when it has one", 2),
    (["--init-from", "cliptnseg-phantom-small", "--engine", "tgcnet"], "tgcnet continues tgcnet models only", 2),
    (["--init-from", "no-such-model"], "unknown model 'no-such-model'; known models: cliptnseg-phantom-small", 3),
])
def test_init_from_refuses_a_model_the_recipe_cannot_continue_before_any_work(args, expected, exit_code, tmp_path,
                                                                             capsys):
    from CLIPSegLib.cli import main

    work = tmp_path / "work"
    code = main(["train", "--output-dir", str(tmp_path / "out"), "--work-dir", str(work)] + TINY_RUN + args)
    assert code == exit_code and expected in capsys.readouterr().err
    assert not work.exists() and not (tmp_path / "out").exists()


def test_train_at_another_input_size_with_a_slice_vote_calibrates_the_voted_maps_at_that_size(tmp_path, monkeypatch):
    """`clipseg train --input-size 64 --slice-vote 3`: the bank is drawn at 64 px, the fine branch works at 64 px
    (the CLIP at its own 128), the spec says both, the calibration judges maps combined with the vote of 3, and the
    re-create command carries both flags (issue: presence under domain shift; small foci of 256-px slices)."""
    from CLIPSegLib.cli import main
    from CLIPSegLib.engines import create_engine
    from CLIPSegLib.models import load_spec
    from CLIPSegLib.training import calibration, datasets

    sizes, votes = [], []
    bank, combine = datasets.PhantomBank, calibration.combine_maps

    class SpyBank(bank):
        def __init__(self, n, size, *args, **kw):
            sizes.append(size)
            super().__init__(n, size, *args, **kw)

    def spy_combine(*args, vote=1, **kw):
        votes.append(vote)
        return combine(*args, vote=vote, **kw)

    monkeypatch.setattr(datasets, "PhantomBank", SpyBank)
    monkeypatch.setattr(calibration, "combine_maps", spy_combine)
    out = tmp_path / "out"
    assert main(["train", "--output-dir", str(out), "--work-dir", str(tmp_path / "w"), "--model-id", "big",
                 "--input-size", "64", "--slice-vote", "3"] + TINY_RUN) == 0
    spec = load_spec(out / "big.json")
    assert sizes == [64] and votes and set(votes) == {3}
    assert spec["network"]["input_size"] == 64 and spec["inference"]["slice_vote"] == 3
    assert "--input-size 64 --slice-vote 3" in spec["training"]["command"]
    engine = create_engine(spec, torch.device("cpu"))
    assert engine.preprocessing.input_size == 64
    probs, _ = engine.predict(torch.rand(2, 1, 64, 64), engine.encode_prompts(["cyst"]))
    assert probs.shape == (2, 1, 64, 64)
