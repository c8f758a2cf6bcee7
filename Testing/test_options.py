"""The one options object: every field reaches the command line, the background argv and the keywords unchanged;
bad values are refused with a message that names them; the lists exist once."""

import dataclasses

import numpy as np
import pytest

from CLIPSegLib import options as opt
from CLIPSegLib.slicer.background import segment_command
from CLIPSegLib.cli import build_parser, main
from CLIPSegLib.errors import InputError
from CLIPSegLib.options import SegmentOptions

from conftest import OPTION_VALUES, random_options

FIELDS = [f.name for f in dataclasses.fields(SegmentOptions)]


def _segment_args(argv):
    return build_parser().parse_args(["segment", "in.nrrd", "--prompt", "cyst", "--output", "o.seg.nrrd", *argv])


def test_every_field_has_a_random_value_maker_for_these_tests():
    assert list(OPTION_VALUES) == FIELDS


def test_options_to_argv_to_argparse_to_options_is_the_identity():
    r = np.random.default_rng(16)
    for _ in range(300):
        options = random_options(r)
        assert SegmentOptions.from_args(_segment_args(options.to_argv())) == options, options.to_argv()
        argv = segment_command("in.nrrd", ["cyst"], "o.seg.nrrd", options, python="PythonSlicer")
        assert argv[:3] == ["PythonSlicer", "-m", "CLIPSegLib.cli"]
        assert SegmentOptions.from_args(build_parser().parse_args(argv[3:])) == options


def test_the_keywords_by_field_name_or_logic_name_give_the_same_options():
    r = np.random.default_rng(5)
    for _ in range(50):
        options = random_options(r)
        values = {name: getattr(options, name) for name in FIELDS}
        assert SegmentOptions(**values) == options
        assert SegmentOptions.from_keywords(**{opt.logic_name(k): v for k, v in values.items()}) == options
        assert SegmentOptions.from_keywords(SegmentOptions(), **values) == options
    assert opt.LOGIC_KEYWORDS == ("model", "engine", "device", "precision", "axis", "threshold", "batchSize",
                                  "keepProbabilities", "spacing")


def test_every_field_has_a_flag_on_clipseg_segment_and_a_use():
    flags = {a.dest: a.option_strings for a in build_parser()._subparsers._group_actions[0].choices["segment"]._actions}
    for name in FIELDS:
        assert flags[name] == [opt.flag(name)]
    uses = {f.name: f.metadata["use"] for f in dataclasses.fields(SegmentOptions)}
    assert set(uses.values()) <= set(opt.USES)
    options = SegmentOptions(model="m", device="cpu", precision="bf16", axis=1, threshold=0.3, batch_size=2,
                             keep_probabilities=True)
    assert options.engine_arguments() == {"model": "m", "engine": None, "device": "cpu", "precision": "bf16"}
    assert options.pipeline_arguments() == {"axis": "1", "batch_size": 2, "keep_probabilities": True,
                                            "presence": {"threshold": 0.3}}
    assert SegmentOptions().pipeline_arguments()["presence"] is None  # the model's own rule


@pytest.mark.parametrize("keywords, message", [
    ({"device": "gpu"}, "unknown device 'gpu'; use auto, cpu or cuda"),
    ({"precision": "fp16"}, "precision 'fp16' is not one of fp32, bf16"),
    ({"axis": 3}, "axis '3' is not one of auto, 0 (I), 1 (J), 2 (K)"),
    ({"axis": "K"}, "axis 'K' is not one of auto, 0 (I), 1 (J), 2 (K)"),
    ({"threshold": 0.0}, "threshold 0.0 must be between 0 and 1 (exclusive), e.g. 0.5"),
    ({"threshold": 1}, "threshold 1 must be between 0 and 1 (exclusive)"),
    ({"threshold": "half"}, "threshold half must be between 0 and 1"),
    ({"batch_size": 0}, "batch size 0 must be at least 1 (slices per forward pass)"),
    ({"batch_size": 2.5}, "batch size 2.5 must be a whole number"),
    ({"spacing": "0,1,1"}, "--spacing '0,1,1' must be one positive size in mm"),
    ({"spacing": (1.0, 2.0)}, "--spacing (1.0, 2.0) must be one positive size in mm"),
    ({"devcie": "cpu"}, "unknown option 'devcie' (did you mean 'device'?); the options are model, engine, device"),
])
def test_bad_values_are_refused_naming_the_value_and_what_is_allowed(keywords, message):
    with pytest.raises(InputError) as e:
        SegmentOptions.from_keywords(**keywords)
    assert message in str(e.value)


def test_values_are_normalised_once():
    options = SegmentOptions(model=None, device="CPU", axis=2, threshold=np.float32(0.25), batch_size=np.int64(3),
                             spacing="0.5, 0.5, 2")
    assert (options.device, options.axis, options.batch_size, options.spacing) == ("cpu", "2", 3, (0.5, 0.5, 2.0))
    assert type(options.threshold) is float and type(options.batch_size) is int
    assert SegmentOptions(model="", engine="").engine_arguments()["model"] is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.device = "cuda"


@pytest.mark.parametrize("argv, message", [
    (["--precision", "fp16"], "precision 'fp16' is not one of fp32, bf16"),
    (["--axis", "3"], "axis '3' is not one of auto"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--batch-size", "0"], "batch size 0 must be at least 1"),
    (["--threshold", "1.5"], "threshold 1.5 must be between 0 and 1"),
])
def test_the_command_line_refuses_bad_options_with_exit_code_2_before_reading_anything(tmp_path, capsys, argv,
                                                                                       message):
    code = main(["segment", str(tmp_path / "missing.nrrd"), "--prompt", "cyst", "--output",
                 str(tmp_path / "o.seg.nrrd"), "--progress", "none", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "does not exist" not in err and "Traceback" not in err


def test_one_copy_of_each_list():
    """No module but options.py spells out the run options' lists (a second copy would drift): every tuple or list
    literal in the package and the Slicer module is compared with them."""
    import ast
    from pathlib import Path

    lists = {tuple(opt.DEVICES), tuple(opt.AXES), tuple(opt.PRECISIONS)}
    root = Path(opt.__file__).resolve().parents[1]
    for path in [root / "CLIPSeg.py"] + sorted((root / "CLIPSegLib").rglob("*.py")):
        if path.name == "options.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in node.elts):
                values = tuple(e.value for e in node.elts)
                assert values not in lists, f"{path.name}:{node.lineno} repeats the list {values} of options.py"


def test_keep_probabilities_writes_them_beside_the_output(phantom_file, tiny_model, tmp_path, capsys):
    from CLIPSegLib.io.outputs import probabilities_path, read_probabilities

    assert probabilities_path(tmp_path / "a.seg.nrrd") == tmp_path / "a.probabilities.nrrd"
    assert probabilities_path(tmp_path / "b.nii.gz") == tmp_path / "b.probabilities.nii.gz"
    path, ph, _ = phantom_file
    code = main(["segment", str(path), "--prompt", "cyst", "--prompt", "nodule", "--output", str(tmp_path / "o.seg.nrrd"),
                 "--model", str(tiny_model), "--device", "cpu", "--progress", "none", "--keep-probabilities"])
    assert code == 0, capsys.readouterr().err
    probabilities = read_probabilities(tmp_path / "o.probabilities.nrrd", 2)
    assert probabilities.shape == (2, *ph.image.shape)


def test_segment_file_takes_an_options_object_and_keywords(phantom_file, tiny_model, tmp_path):
    from CLIPSegLib.inference.segment_file import load_engine, segment_file

    path, ph, _ = phantom_file
    options = SegmentOptions(model=str(tiny_model), device="cpu", axis="2")
    engine = load_engine(**options.engine_arguments())
    result = segment_file(path, ["cyst"], tmp_path / "o.seg.nrrd", options, engine_instance=engine,
                          threshold=0.4, keep_probabilities=True)
    assert result.probabilities.shape == (1, *ph.image.shape)
    assert (tmp_path / "o.probabilities.nrrd").exists()
    assert result.findings[0].info["threshold"] == pytest.approx(0.4)
