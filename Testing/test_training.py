import torch

from CLIPSegLib.datasets import PhantomBank
from CLIPSegLib.engines.cliptnseg import build_network
from CLIPSegLib.training import train_clip, train_segmenter

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

    from CLIPSegLib.datasets import TRAIN_VOLUME_SEED_BASE
    from CLIPSegLib.phantoms import FINDINGS, random_volume_phantom

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
