"""File in, file out: read an image, segment every prompt, write a .seg.nrrd (or label map) and probabilities.

All checks that can fail cheaply (prompts, output folder and type, model, device) run before the model does any
work; outputs are written atomically, so a failed run leaves no output file behind.
"""

from __future__ import annotations

from pathlib import Path

from .checks import check_prompts
from .errors import InputError
from .imageio import (atomic_paths, check_output_path, is_picture, output_files, parse_spacing, read_image,
                      write_probabilities, write_segmentation)
from .pipeline import SegmentationResult, resolve_device, segment_volume
from .progress import Progress


def load_engine(model: str | None = None, engine: str | None = None, device: str = "auto", precision: str = "fp32",
                notify=None):
    """Model id or spec path + engine name + device name + precision (fp32|bf16) -> a ready engine (weights
    verified). bf16 on a CPU without native bf16 arithmetic runs in fp32 instead, said through ``notify(text)``."""
    from .engines import check_engine, create_engine
    from .engines.contract import check_precision, native_bf16
    from .models import load_spec

    if engine:
        check_engine(engine)
    check_precision(precision)
    dev = resolve_device(device)
    if precision == "bf16" and dev.type == "cpu" and native_bf16() is False:
        precision = "fp32"
        if notify is not None:
            notify("--precision bf16 ignored: this CPU has no native bf16 arithmetic (AVX-512 BF16 or AMX), where bf16 "
                   "measured about 2x slower than fp32; running in fp32 (same masks)")
    spec = load_spec(model)
    return create_engine(spec, dev, engine, precision)


def segment_file(input_path, prompts, output, model=None, engine=None, device="auto", axis="auto",
                 probabilities=None, progress: Progress | None = None, batch_size: int | None = None,
                 engine_instance=None, cancel=None, threshold: float | None = None,
                 precision: str = "fp32", spacing=None) -> SegmentationResult:
    """Segment ``prompts`` in ``input_path`` and write ``output`` (+ optional ``probabilities``).

    ``spacing``: mm per voxel replacing the file's (``imageio.parse_spacing``: one value for I and J, or I,J,K);
    a picture without it has 1.0 mm pixels."""
    progress = progress or Progress("none")
    prompts = check_prompts(prompts)
    spacing = parse_spacing(spacing)
    output = check_output_path(output, what="--output")
    named = [("--output", f) for f in output_files(output)]
    if probabilities:
        named.append(("--probabilities", check_output_path(probabilities, kinds=("labelmap",),
                                                           what="--probabilities")))
    source = Path(input_path).resolve()
    for option, file in named:
        if file.resolve() == source:
            raise InputError(f"{option}: {file} is the input image; choose another file name (the input is never "
                             f"overwritten)")
    files = [f for _, f in named]
    if len({f.resolve() for f in files}) < len(files):
        raise InputError(f"--probabilities must be a different file from the outputs of --output "
                         f"({', '.join(str(f) for f in files[:-1])})")
    probabilities = files[-1] if probabilities else None
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise InputError(f"threshold {threshold} must be between 0 and 1 (exclusive), e.g. 0.5")
    volume, geometry = read_image(input_path, spacing)
    if is_picture(input_path) and spacing is None:
        progress.message(f"{Path(input_path).name} is a picture: it has no physical pixel size (a DPI is ignored), so "
                         f"pixels are taken as 1.0 mm; the found / not-found rules measure findings in mm, so give "
                         f"--spacing MM with the real pixel size when you know it")
    elif spacing is not None:
        progress.message(f"voxel spacing set by --spacing to {', '.join(f'{v:g}' for v in geometry.spacing)} mm "
                         f"(I, J, K); the outputs carry it too")
    eng = engine_instance or load_engine(model, engine, device, precision, notify=progress.message)
    presence = {"threshold": threshold} if threshold is not None else None
    result = segment_volume(eng, volume, geometry, prompts, axis=axis, batch_size=batch_size, presence=presence,
                            keep_probabilities=bool(probabilities), progress=progress, cancel=cancel)
    if result.domain_warning:
        progress.message(result.domain_warning)
    for f in result.findings:
        progress.message(f.message())
    # All files are written under temporary names and renamed only once all exist, so a failure in any leaves
    # the files that were at these paths before untouched.
    with atomic_paths(files) as temporary:
        write_segmentation(output, result.masks, geometry, temporary)
        if probabilities:
            write_probabilities(probabilities, result.probabilities, geometry, temporary)
    return result
