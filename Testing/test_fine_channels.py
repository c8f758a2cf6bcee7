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


@pytest.mark.parametrize("context", [0, 1])
def test_a_widened_network_starts_as_the_narrow_one_and_its_new_channels_reach_the_output(context):
    from CLIPSegLib.engines.cliptnseg.network import build_network, widen_from

    torch.manual_seed(0)
    narrow = build_network(_spec(NARROW)).eval()
    wide = build_network(_spec(WIDE, context)).eval()
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
    torch.testing.assert_close(fine[:, :NARROW[0]], ref_fine)
    assert fine[:, NARROW[0]:].abs().amax() > 1e-3
    # once the head reads the new channels (their fuse weights off zero), the output moves
    with torch.no_grad():
        wide.fuse.weight[:, wide.cfg["coarse_channels"] + NARROW[0]:] += 0.5
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
        torch.testing.assert_close(new[skip_new:skip_new + old.shape[0] - skip_old, :rows], old[skip_old:])
        assert new[skip_old:skip_new, :rows].abs().max() == 0


@pytest.mark.parametrize("args, expected", [
    (["--fine-channels", "8,x"], None),  # argparse refuses it (exit 2)
    (["--fine-channels", "8"], "--fine-channels 8: give 2 to 6 channel counts of 1 to 512"),
    (["--fine-channels", "8,0"], "--fine-channels 8,0: give 2 to 6 channel counts"),
    (["--engine", "tgcnet", "--fine-channels", "8,16"], "--fine-channels does not apply"),
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


@pytest.mark.parametrize("fine, context, expected", [
    ([4, 4, 12], 1, "--fine-channels 4,4,12: --init-from .*parent.json has fine channels 4,8,12; give as many "
                    "levels, none narrower"),
    ([4, 8], 1, "--fine-channels 4,8: .* give as many levels"),
    (NARROW, 2, "reads 1 neighbouring slices on each side; give --context-slices 1"),
])
def test_init_from_refuses_a_narrower_or_differently_shaped_request(fine, context, expected, tmp_path):
    from CLIPSegLib.engines.cliptnseg.network import build_network
    from CLIPSegLib.errors import InputError
    from CLIPSegLib.models import write_spec
    from CLIPSegLib.training.cliptnseg_recipe import warm_start

    parent = {**_spec(NARROW, 1), "id": "parent"}
    write_spec(parent, build_network(parent).state_dict(), tmp_path)
    spec = _spec(fine, context)
    with pytest.raises(InputError, match=expected):
        warm_start(str(tmp_path / "parent.json"), spec)
