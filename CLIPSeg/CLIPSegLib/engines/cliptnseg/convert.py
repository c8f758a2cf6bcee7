"""A CLIP-TNseg model from the public CLIPSeg checkpoint (``CIDAS/clipseg-rd64-refined``): ``clipseg models convert``.

Reads the files as Hugging Face publishes them (``config.json``, ``preprocessor_config.json``, ``model.safetensors``
or ``pytorch_model.bin``; ``vocab.json`` / ``merges.txt`` when present), with no network and without transformers,
and writes a cliptnseg model spec + fp32 safetensors:

- CLIP towers: open_clip, built from the checkpoint's CLIP config, weights mapped from the CLIP inside the CLIPSeg
  checkpoint (``clip_weights.hf_clip_to_open_clip``; CLIPSeg trained its decoder on OpenAI's frozen ViT-B/16, so these
  are OpenAI's weights and one download reproduces CLIPSeg), or taken from an open_clip checkpoint such as OpenAI's
  ViT-B/16 as open_clip publishes it (``clip=``; the largest difference to the CLIPSeg checkpoint's own CLIP weights
  is recorded in the spec);
- the coarse branch in CLIPSeg's style (``network.coarse_style: "clipseg"``) with CLIPSeg's decoder weights: the
  extracted layers (Hugging Face's ``hidden_states[i + 1]`` = the output of block i + 1), reductions, FiLM on the
  unnormalised text embedding, post-norm ReLU decoder layers, its (complex or simple) transposed convolutions;
- the fine branch and head freshly initialised (seeded), the head's last convolution zero and ``residual_head`` on,
  so that with ``coarse_only: false`` (what fine-tuning trains) the model starts from CLIPSeg's logits;
- ``coarse_only: true``: it segments with the pure CLIPSeg decoder until fine-tuned;
- the input size, mean and std of the checkpoint's image processor (352 px, ImageNet statistics for CLIPSeg),
  tokenisation with open_clip's CLIP BPE (the checkpoint's vocabulary is checked against it), context 77;
- no calibrated found / not-found rule (a permissive global rule) and no domain ranges (nothing is checked).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ...errors import InputError, ModelError
from ..clip_weights import hf_clip_to_open_clip, load_clip_weights, open_clip_config, resize_positions, stack_qkv

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the first one present is read
# Hugging Face's defaults for entries an older config.json leaves out (transformers' CLIPSeg configuration)
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                 "layer_norm_eps": 1e-5}
CLIPSEG_DEFAULTS = {"projection_dim": 512, "extract_layers": [3, 6, 9], "reduce_dim": 64,
                    "decoder_num_attention_heads": 4, "decoder_intermediate_size": 2048, "conditional_layer": 0,
                    "use_complex_transposed_convolution": False}
VIT_PROCESSOR_DEFAULTS = {"do_resize": True, "size": {"height": 224, "width": 224}, "do_rescale": True,
                          "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
                          "image_std": [0.5, 0.5, 0.5]}
# the fine branch and head added to CLIPSeg's decoder (paper-size CLIP-TNseg, as in benchmarks/latency.py)
FINE = {"fine_channels": [16, 32, 64, 128], "head_channels": 32}
CLIP_TOKEN_NAMES = {"<|startoftext|>": "<start_of_text>", "<|endoftext|>": "<end_of_text>"}  # HF -> open_clip
_DECODER_LAYER = {"layer_norm1": "norm1", "layer_norm2": "norm2", "mlp.fc1": "linear1", "mlp.fc2": "linear2",
                  "self_attn.out_proj": "self_attn.out_proj"}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not readable JSON ({e}); download it again") from e
    if not isinstance(data, dict):
        raise ModelError(f"{path} holds a JSON {type(data).__name__}, not an object; download it again")
    return data


def sub_config(config: dict, name: str, defaults: dict) -> dict:
    """A tower's config as transformers reads it: ``defaults``, then ``config[name]``, then the older
    ``config[name + "_dict"]`` (which wins, as in transformers)."""
    return {**defaults, **(config.get(name) or {}), **(config.get(name + "_dict") or {})}


def read_clipseg(folder: Path) -> tuple[dict, dict, dict]:
    """A folder as Hugging Face lays out a CLIPSeg checkpoint -> (config, image processor config, tensors).
    ModelError naming a missing file, a config that is not CLIPSeg's, or unreadable weights."""
    from ...models import load_checkpoint

    folder = Path(folder)
    for name in ("config.json", "preprocessor_config.json"):
        if not (folder / name).is_file():
            raise ModelError(f"{folder} has no {name}: give the folder of a CLIPSeg checkpoint as Hugging Face "
                             f"publishes it (config.json, preprocessor_config.json, model.safetensors), or fetch it: "
                             f"`clipseg models fetch clipseg-rd64-refined`")
    config = _read_json(folder / "config.json")
    if config.get("model_type") != "clipseg":
        raise ModelError(f"{folder / 'config.json'} is a {config.get('model_type')!r} model, not CLIPSeg "
                         f"(model_type 'clipseg'); give a CLIPSeg checkpoint such as CIDAS/clipseg-rd64-refined")
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise ModelError(f"{folder} holds no weights ({' or '.join(WEIGHT_FILES)}); fetch or import them")
    return config, _read_json(folder / "preprocessor_config.json"), load_checkpoint(weights)


def check_tokenizer(folder: Path) -> None:
    """If the checkpoint ships ``vocab.json`` / ``merges.txt``, they must be CLIP's BPE, the one open_clip tokenises
    with (special tokens named the Hugging Face way); ModelError saying how many entries differ otherwise."""
    from ..clip_backbone import bpe_tokenizer

    folder = Path(folder)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not vocab.is_file() and not merges.is_file():
        return
    bpe = bpe_tokenizer()
    problems = []
    if vocab.is_file():
        theirs = {CLIP_TOKEN_NAMES.get(k, k): v for k, v in _read_json(vocab).items()}
        differ = sum(theirs.get(k) != v for k, v in bpe.encoder.items()) + len(set(theirs) - set(bpe.encoder))
        if differ:
            problems.append(f"{differ} of the {len(bpe.encoder)} vocabulary entries")
    if merges.is_file():
        lines = merges.read_text(encoding="utf-8").split("\n")
        lines = [ln.rstrip("\r") for ln in lines[lines[0].startswith("#version"):] if ln.rstrip("\r")]
        ours = [" ".join(pair) for pair in sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)]
        if lines != ours:
            same = next((i for i, (a, b) in enumerate(zip(lines, ours)) if a != b), min(len(lines), len(ours)))
            problems.append(f"the merges from rule {same} on ({len(lines)} rules, CLIP has {len(ours)})")
    if problems:
        raise ModelError(f"the checkpoint's tokenizer in {folder} is not CLIP's byte-pair encoding "
                         f"({'; '.join(problems)} differ): CLIP-TNseg tokenises with open_clip's CLIP BPE, so it "
                         f"cannot reproduce this model")


def clipseg_spec(config: dict, processor: dict, model_id: str) -> dict:
    """The cliptnseg model spec (without files) of a CLIPSeg checkpoint's config and image processor config."""
    vision = sub_config(config, "vision_config", VISION_DEFAULTS)
    text = sub_config(config, "text_config", TEXT_DEFAULTS)
    top = {**CLIPSEG_DEFAULTS, **config}
    proc = {**VIT_PROCESSOR_DEFAULTS, **processor}
    size, patch = proc["size"], vision["patch_size"]
    side = size.get("height") if isinstance(size, dict) else size
    if not (isinstance(size, dict) and size.get("width") == side and isinstance(side, int)) or side % patch:
        raise ModelError(f"image processor size {size!r}: CLIP-TNseg needs a square input whose side is a multiple of "
                         f"the patch size {patch} (CLIPSeg's is {{'height': 352, 'width': 352}})")
    if not (proc["do_resize"] and proc["do_rescale"] and abs(proc["rescale_factor"] - 1 / 255) < 1e-9):
        raise ModelError("the image processor does not resize 8-bit images and scale them to [0, 1] as CLIPSeg's "
                         "does (do_resize, do_rescale, rescale_factor 1/255); this converter cannot reproduce it")
    if text["vocab_size"] != 49408:
        raise ModelError(f"the text tower has {text['vocab_size']} tokens, not CLIP's 49,408: CLIP-TNseg tokenises "
                         f"with CLIP's byte-pair encoding, so it cannot run this model")
    layers = [int(i) + 1 for i in top["extract_layers"]]  # hidden_states[i + 1]: the output of block i + 1
    if not all(1 <= d <= vision["num_hidden_layers"] for d in layers):
        raise ModelError(f"extract_layers {top['extract_layers']} reach past the {vision['num_hidden_layers']} "
                         f"blocks of the image tower; the config is damaged")
    mean, std = (proc["image_mean"], proc["image_std"]) if proc["do_normalize"] else ([0.0] * 3, [1.0] * 3)
    network = {"extract_layers": layers, "reduce_dim": top["reduce_dim"],
               "decoder_heads": top["decoder_num_attention_heads"], "decoder_ff": top["decoder_intermediate_size"],
               "film_layer": top["conditional_layer"], "layer_norm_eps": vision["layer_norm_eps"],
               "coarse_style": "clipseg", "coarse_channels": 1,
               "transposed_conv": "complex" if top["use_complex_transposed_convolution"] else "simple",
               "text_normalize": False, "image_mean": [float(v) for v in mean], "image_std": [float(v) for v in std],
               "coarse_only": True, "residual_head": True, "presence_head": False, **FINE}
    return {
        "id": model_id, "engine": "cliptnseg",
        "description": "CLIPSeg (Lüddecke & Ecker, CVPR 2022) converted to CLIP-TNseg: OpenAI CLIP ViT-B/16 towers "
                       "and CLIPSeg's decoder trained on PhraseCut natural images. coarse_only: segments with the pure "
                       "CLIPSeg decoder; fine-tune it (coarse_only false) on labelled scans before relying on it. "
                       "Not calibrated for medical images, not for clinical use.",
        "license": "Apache-2.0 (CLIPSeg weights, CIDAS/clipseg-rd64-refined); MIT (OpenAI CLIP weights)",
        "citation": "Lüddecke & Ecker, Image Segmentation Using Text and Image Prompts, CVPR 2022; Radford et al., "
                    "CLIP, ICML 2021; Sun et al., CLIP-TNseg, IEEE SPL 2025",
        "clip": open_clip_config(vision, text, top["projection_dim"], side),
        "network": network,
        "preprocessing": {"fit": "squash", "intensity": "percentile"},  # the processor resizes without padding
        "inference": {"flip_average": False},
        "presence": {"threshold": 0.5, "min_peak": 0.5, "min_mean": 0.0, "min_extent_mm": 0.0, "min_area_mm2": 0.0,
                     "slice_gate": 1.0, "calibration": None,
                     "note": "not calibrated: a permissive global rule (every region above probability 0.5 is "
                             "kept); calibrate it on labelled scans"},
        "domain": {"modality": "natural photographs (CLIPSeg's PhraseCut); no feature ranges, so images are not "
                               "checked against them"},
        "training": {"phrases": []},
    }


def decoder_state(state: dict) -> dict:
    """CLIPSeg's ``decoder.*`` tensors -> the state dict of ``CoarseBranch`` in the clipseg style (keys under
    ``coarse.``). ModelError naming a key it does not know."""
    out, qkv = {}, {}
    for key, value in state.items():
        if not key.startswith("decoder."):
            continue
        k = key[len("decoder."):]
        if m := re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", k):
            layer, part, kind = m.groups()
            block = f"coarse.blocks.{layer}"
            if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((block, kind), {})[part[10]] = value
                continue
            if part not in _DECODER_LAYER:
                raise ModelError(f"checkpoint key {key!r} is not part of a CLIPSeg decoder layer; the checkpoint "
                                 f"is not CLIPSeg's")
            out[f"{block}.{_DECODER_LAYER[part]}.{kind}"] = value
        elif m := re.fullmatch(r"film_(mul|add)\.(weight|bias)", k):
            out[f"coarse.film.{'scale' if m[1] == 'mul' else 'shift'}.{m[2]}"] = value
        elif m := re.fullmatch(r"transposed_convolution\.(?:(\d+)\.)?(weight|bias)", k):
            out[f"coarse.upsample.{m[1] or 0}.{m[2]}"] = value
        elif k.startswith("reduces."):
            out[f"coarse.{k}"] = value
        else:
            raise ModelError(f"checkpoint key {key!r} is not part of CLIPSeg's decoder; the checkpoint is not "
                             f"CLIPSeg's")
    return {**out, **stack_qkv(qkv, "{}.self_attn.in_proj_{}")}


def _digests(paths) -> dict:
    from ...models import sha256_file

    return {Path(p).name: sha256_file(Path(p)) for p in paths if Path(p).is_file()}


def convert_clipseg(folder: Path, out_dir: Path, model_id: str, clip_file: Path | None = None, force: bool = False,
                    seed: int = 0, source: str | None = None, command: str = "") -> tuple[Path, dict]:
    """Convert the CLIPSeg checkpoint in ``folder`` (see ``read_clipseg``) into ``out_dir/<model_id>.{json,
    safetensors}`` (fp32; refused if they exist, unless ``force``). ``clip_file``: an open_clip-layout CLIP checkpoint
    whose towers replace the CLIPSeg checkpoint's CLIP. ``source``: how the checkpoint was named (a registry id),
    recorded in the spec with the SHA-256 of the files read. Returns (spec path, the ``conversion`` record)."""
    from ...models import load_checkpoint, write_spec
    from ...training.cliptnseg_recipe import check_output_free
    from .network import build_network

    check_output_free(Path(out_dir), model_id, force)
    folder = Path(folder)
    config, processor, state = read_clipseg(folder)
    check_tokenizer(folder)
    spec = clipseg_spec(config, processor, model_id)
    torch.manual_seed(seed)
    net = build_network(spec)
    clip_state = hf_clip_to_open_clip(state, prefix="clip.")
    record = {"clipseg": {"source": source or str(folder),
                          "files": _digests(folder / n for n in ("config.json", "preprocessor_config.json",
                                                                 *WEIGHT_FILES))},
              "clip_towers": "the CLIP inside the CLIPSeg checkpoint"}
    if clip_file is not None:
        other = {k.removeprefix("module."): v for k, v in load_checkpoint(Path(clip_file)).items()
                 if isinstance(v, torch.Tensor)}
        record["clip_towers"] = str(clip_file)
        record["clip_file"] = _digests([clip_file])
        record["clip_max_abs_difference_to_clipseg"] = clip_difference(other, clip_state)
        clip_state = other
    load_clip_weights(net.clip, clip_state, str(clip_file or folder))
    try:
        net.coarse.load_state_dict({k.removeprefix("coarse."): v for k, v in decoder_state(state).items()})
    except RuntimeError as e:  # missing, unexpected, or of another shape
        raise ModelError(f"CLIPSeg's decoder weights in {folder} do not fit the decoder its config describes "
                         f"({' '.join(str(e).split())[:300]}); the config and weights come from "
                         f"different checkpoints, or the weights are incomplete") from e
    torch.nn.init.zeros_(net.head[-1].weight)  # with residual_head the full model starts as CLIPSeg
    torch.nn.init.zeros_(net.head[-1].bias)
    spec["conversion"] = record
    spec["training"]["command"] = command
    return write_spec(spec, net.state_dict(), Path(out_dir), half=False), record


def clip_difference(a: dict, b: dict) -> float:
    """Largest absolute difference between two open_clip-layout CLIP state dicts (vision positional embeddings
    compared at ``b``'s grid); ModelError when they are not the same architecture."""
    keys = (set(a) & set(b)) - {"logit_bias"}
    if not keys or any(a[k].numel() != b[k].numel() for k in keys - {"visual.positional_embedding"}):
        raise ModelError("the CLIP checkpoint is not the architecture of the CLIPSeg checkpoint's CLIP (tensor sizes "
                         "differ); give OpenAI's ViT-B/16 (`openai-clip-vit-b16`)")
    worst = 0.0
    for k in keys:
        x, y = a[k].float(), b[k].float()
        if k == "visual.positional_embedding" and x.shape != y.shape:
            g = int(round((y.shape[0] - 1) ** 0.5))
            x = resize_positions(x, (g, g))
        worst = max(worst, float((x.reshape(y.shape) - y).abs().max()))
    return worst


def resolve_source(name: str, role: str, registry: dict | None = None) -> Path:
    """``name``: a registry id of ``role`` ("clipseg": its cache folder; "clip": its weight file), its files verified
    against their SHA-256, or a folder / file given by path. ModelError naming ``clipseg models fetch`` / ``import``
    when the files are not all here."""
    from ...models import store

    path = Path(name)
    if path.exists():
        if role == "clipseg" and not path.is_dir():
            raise InputError(f"{path} is a file; give the folder holding config.json, preprocessor_config.json and "
                             f"the weights, or a registry id (`clipseg models list`)")
        return path
    m = store.entry(name, registry)
    if m["role"] != role:
        raise InputError(f"{name} is a {m['role']} entry, not a {role} checkpoint; see `clipseg models list`")
    bad = {n: s for n, s in store.verify(name, registry).items() if s != "present"}
    if bad:
        raise ModelError(f"{name} is not complete on this computer ({', '.join(f'{n} {s}' for n, s in bad.items())});"
                         f" download it with `clipseg models fetch {name}`, or copy its files over and run `clipseg "
                         f"models import {name} FILE...`")
    folder = store.model_dir(m)
    if role == "clipseg":
        return folder
    return next(folder / f["name"] for f in m["files"] if f["name"].endswith((".safetensors", ".bin", ".pt")))


def convert_command(source: str, output_dir: str, model_id: str | None = None, clip: str | None = None,
                    force: bool = False, registry: dict | None = None) -> str:
    """``clipseg models convert``: resolve ``source`` (a ``clipseg`` registry id or a folder) and ``clip`` (a ``clip``
    registry id or an open_clip checkpoint file), convert, and say what was written and how to use it."""
    model_id = model_id or f"cliptnseg-{Path(source).name}"
    folder = resolve_source(source, "clipseg", registry)
    clip_file = resolve_source(clip, "clip", registry) if clip else None
    command = (f"clipseg models convert {source} --output-dir {output_dir} --model-id {model_id}"
               + (f" --clip {clip}" if clip else "") + " --force")
    path, record = convert_clipseg(folder, Path(output_dir), model_id, clip_file, force, source=source,
                                   command=command)
    lines = [f"wrote {path} (+ {path.with_suffix('.safetensors').name}): CLIP towers from {record['clip_towers']}, "
             f"coarse branch from CLIPSeg's decoder, fine branch and head new (coarse_only: true)"]
    if "clip_max_abs_difference_to_clipseg" in record:
        lines.append(f"largest difference between the two CLIP weight sets: "
                     f"{record['clip_max_abs_difference_to_clipseg']:.3g}")
    lines.append(f"segment with it: clipseg segment IMAGE --prompt TEXT --output OUT.seg.nrrd --model {path}; or "
                 f"`clipseg models import {path}` to use it by its id ({model_id})")
    return "\n".join(lines)
