"""A wider fine branch (network ``fine_channels``, ``clipseg train --fine-channels``): a narrower network's weights
widened so the wide network starts as exactly the narrow one (``network.widen_from``), and the refusals."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_SPEC

NARROW = [4, 8, 12]
WIDE = [6, 16, 12]  # a level kept as it is, so mixed widths are covered


def _spec(fine, context=0):
    return {**TINY_SPEC, "network": {**TINY_SPEC["network"], "fine_channels": fine, "context_slices": context}}


@pytest.mark.parametrize("narrow_fc, wide_fc, context", [
    (NARROW, WIDE, 0), (NARROW, WIDE, 1),
    ([1, 8], [3, 8], 1),  # a level of one channel widened to three, as the input is: mapped by layer, not by shape
])
def test_a_widened_network_starts_as_the_narrow_one_and_its_new_channels_reach_the_output(narrow_fc, wide_fc,
                                                                                          context):
    from CLIPSegLib.engines.cliptnseg.network import build_network, widen_from

    torch.manual_seed(0)
    narrow = build_network(_spec(narrow_fc)).eval()
    wide = build_network(_spec(wide_fc, context)).eval()
    wide.load_state_dict(widen_from(narrow.state_dict(), wide, narrow.cfg))
    x = torch.rand(3, 1 + 2 * context, 32, 32)
    text = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    with torch.no_grad():
        mask, presence = wide(x, text)
        ref_mask, ref_presence = narrow(x[:, context:context + 1], text)
        # the fine branch's old output channels are the narrow branch's, the new ones are not dead
        fine, ref_fine = wide.fine(x), narrow.fine(x[:, context:context + 1])
    torch.testing.assert_close(mask, ref_mask)
    torch.testing.assert_close(presence, ref_presence)
    torch.testing.assert_close(fine[:, :narrow_fc[0]], ref_fine)
    assert fine[:, narrow_fc[0]:].abs().amax() > 1e-3
    # once the head reads the new channels (their fuse weights off zero), the output moves
    with torch.no_grad():
        wide.fuse.weight[:, wide.cfg["coarse_channels"] + narrow_fc[0]:] += 0.5
        changed, _ = wide(x, text)
    assert (changed - ref_mask).abs().max() > 1e-3


def test_the_skip_connections_halves_are_mapped_apart():
    """Every transposed convolution of the U-Net reads [skip, deeper]: the narrow kernels sit at the start of each
    half of the wide one, and the rows of old channels read nothing else."""
    from CLIPSegLib.engines.cliptnseg.network import build_network, widen_from

    narrow, wide = build_network(_spec(NARROW)), build_network(_spec(WIDE))
    state = widen_from(narrow.state_dict(), wide, narrow.cfg)
    keys = [k for k, m in wide.named_modules() if isinstance(m, torch.nn.ConvTranspose2d) and k.startswith("fine.")]
    assert len(keys) == len(NARROW) - 1
    for key in keys:
        old, new = narrow.state_dict()[key + ".weight"], state[key + ".weight"]  # [in, out, k, k]
        level = key.count("submodule")
        skip_old, skip_new = NARROW[level], WIDE[level]
        rows = old.shape[1]
        torch.testing.assert_close(new[:skip_old, :rows], old[:skip_old])
        deeper = old.shape[0] - skip_old
        torch.testing.assert_close(new[skip_new:skip_new + deeper, :rows], old[skip_old:])
        assert new[skip_old:skip_new, :rows].abs().sum() == 0
        assert new[skip_new + deeper:, :rows].abs().sum() == 0


@pytest.mark.parametrize("args, expected", [
    (["--fine-channels", "8,x"], None),  # argparse refuses it (exit 2)
    (["--fine-channels", "8"], "--fine-channels 8: give 2 to 6 channel counts of 1 to 512"),
    (["--fine-channels", "8,0"], "--fine-channels 8,0: give 2 to 6 channel counts"),
    (["--engine", "tgcnet", "--fine-channels", "8,16"], "--fine-channels does not apply"),
    (["--input-size", "32", "--fine-channels", "4,8,16,32,64,128"], "6 levels halve a 32-pixel slice 5 times"),
])
def test_train_refuses_bad_fine_channels_before_any_work(args, expected, tmp_path, capsys, monkeypatch):
    from CLIPSegLib.cli import main
    from CLIPSegLib.training import cliptnseg_recipe

    monkeypatch.setattr(cliptnseg_recipe, "run_training", lambda *a, **k: pytest.fail("training started"))
    try:
        code = main(["train", "--output-dir", str(tmp_path / "out"), "--progress", "none"] + args)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert (expected or "is not a list of whole numbers") in err


def _parent(tmp_path, fine=NARROW, context=1):
    from CLIPSegLib.engines.cliptnseg.network import build_network
    from CLIPSegLib.models import load_spec, load_weights, write_spec

    torch.manual_seed(3)
    parent = {**_spec(fine, context), "id": "parent"}
    write_spec(parent, build_network(parent).state_dict(), tmp_path)
    path = str(tmp_path / "parent.json")
    net = build_network(parent).eval()
    net.load_state_dict(load_weights(load_spec(path)))  # as stored (half precision)
    return path, net


@pytest.mark.parametrize("fine, context, expected", [
    ([4, 4, 12], 1, "--fine-channels 4,4,12: --init-from .*parent.json has fine channels 4,8,12; give as many "
                    "levels, none narrower"),
    ([4, 8], 1, "--fine-channels 4,8: .* give as many levels"),
    ([4, 12, 12], 1, "the deepest two equal only where they are equal in it"),  # MONAI: no bottom residual then
    (NARROW, 2, "reads 1 neighbouring slice on each side; give --context-slices 1"),
])
def test_init_from_refuses_a_narrower_or_differently_shaped_request(fine, context, expected, tmp_path):
    from CLIPSegLib.errors import InputError
    from CLIPSegLib.training.cliptnseg_recipe import warm_start

    path, _ = _parent(tmp_path)
    with pytest.raises(InputError, match=expected):
        warm_start(path, _spec(fine, context), fine)


def test_init_from_a_parent_with_another_head_is_refused_by_name_not_by_a_crash(tmp_path):
    from CLIPSegLib.errors import InputError
    from CLIPSegLib.training.cliptnseg_recipe import warm_start

    path, _ = _parent(tmp_path)
    spec = _spec(WIDE, 1)
    spec["network"]["head_channels"] = 2  # the parent's: 4 (a narrower fuse once crashed the widening)
    with pytest.raises(InputError, match="its network is not the recipe.s .*first difference: fuse"):
        warm_start(path, spec, WIDE)


def test_init_from_widens_the_parent_or_keeps_its_channels_when_none_are_given(tmp_path):
    """``warm_start``: with --fine-channels wider, the state it returns makes the recipe's network the parent's
    exactly; without, the spec takes the parent's channels (a continuation of a wide model stays wide)."""
    from CLIPSegLib.engines.cliptnseg.network import build_network
    from CLIPSegLib.training.cliptnseg_recipe import warm_start

    path, parent_net = _parent(tmp_path)
    spec = _spec([8, 8, 8], 1)
    _, state = warm_start(path, spec, WIDE, seed=5)
    assert spec["network"]["fine_channels"] == WIDE
    wide = build_network(spec).eval()
    wide.load_state_dict(state)
    x = torch.rand(2, 3, 32, 32)
    text = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(wide(x, text)[0], parent_net(x, text)[0])
    _, again = warm_start(path, _spec([8, 8, 8], 1), WIDE, seed=5)
    assert all(torch.equal(state[k], again[k]) for k in state)  # the new channels' weights follow the seed
    kept = _spec([8, 8, 8], 1)
    warm_start(path, kept, None)
    assert kept["network"]["fine_channels"] == NARROW


def test_init_from_refuses_inherited_levels_too_deep_for_the_slice(tmp_path):
    from CLIPSegLib.errors import InputError
    from CLIPSegLib.training.cliptnseg_recipe import warm_start

    path, _ = _parent(tmp_path, fine=[4, 8, 12, 16, 20], context=0)
    spec = _spec([8, 8], 0)
    spec["network"]["input_size"] = 16
    with pytest.raises(InputError, match="5 levels halve a 16-pixel slice 4 times"):
        warm_start(path, spec, None)
