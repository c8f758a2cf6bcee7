"""File in, file out: read an image, segment every prompt, write a .seg.nrrd (or label map) and probabilities.

All checks that can fail cheaply (prompts, output folder and type, model, device) run before the model does any
work; outputs are written atomically, so a failed run leaves no output file behind.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..checks import check_prompts
from ..errors import InputError
from ..io.outputs import (atomic_paths, check_output_path, output_files, probabilities_path, write_probabilities,
                          write_segmentation)
from ..io.read import is_picture, read_image
from ..options import SegmentOptions
from .pipeline import SegmentationResult, resolve_device, segment_volume
from ..progress import Progress


def load_engine(model: str | None = None, engine: str | None = None, device: str = "auto", precision: str = "fp32",
                notify=None):
    """Model id or spec path + engine name + device name + precision (fp32|bf16) -> a ready engine (weights
    verified). bf16 on a CPU where it does not pay (no AMX) runs in fp32 instead, said through ``notify(text)``."""
    from ..engines import check_engine, create_engine
    from ..engines.contract import effective_precision
    from ..models import load_spec

    if engine:
        check_engine(engine)
    dev = resolve_device(device)
    precision = effective_precision(precision, dev, notify)
    spec = load_spec(model)
    return create_engine(spec, dev, engine, precision)


def segment_file(input_path, prompts, output, options: SegmentOptions | None = None, *, probabilities=None,
                 progress: Progress | None = None, engine_instance=None, cancel=None,
                 **keywords) -> SegmentationResult:
    """Segment ``prompts`` in ``input_path`` and write ``output`` (+ the probabilities when ``probabilities`` names
    a file or the options keep them: then beside ``output``, ``io.outputs.probabilities_path``).

    ``options`` (default: all defaults) with ``keywords`` changed: any ``SegmentOptions`` field, e.g.
    ``device="cpu"``, ``spacing="0.3"`` (mm per voxel replacing the file's: one value for I and J, or I,J,K; a
    picture without it has 1.0 mm pixels). ``engine_instance``: an engine already loaded (the model options are then
    not used)."""
    options = SegmentOptions.from_keywords(options, **keywords)
    progress = progress or Progress("none")
    prompts = check_prompts(prompts)
    output = check_output_path(output, what="--output")
    if options.keep_probabilities and not probabilities:
        probabilities = probabilities_path(output)
    named = [("--output", f) for f in output_files(output)]
    if probabilities:
        named.append(("--probabilities", check_output_path(probabilities, kinds=("labelmap",),
                                                           what="--probabilities")))
        options = replace(options, keep_probabilities=True)
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
    volume, geometry = read_image(input_path, options.spacing)
    if is_picture(input_path) and options.spacing is None:
        progress.message(f"{Path(input_path).name} is a picture: it has no physical pixel size (a DPI is ignored), so "
                         f"pixels are taken as 1.0 mm; the found / not-found rules measure findings in mm, so give "
                         f"--spacing MM with the real pixel size when you know it")
    elif options.spacing is not None:
        progress.message(f"voxel spacing set by --spacing to {', '.join(f'{v:g}' for v in geometry.spacing)} mm "
                         f"(I, J, K); the outputs carry it too")
    eng = engine_instance or load_engine(**options.engine_arguments(), notify=progress.message)
    result = segment_volume(eng, volume, geometry, prompts, **options.pipeline_arguments(), progress=progress,
                            cancel=cancel)
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
