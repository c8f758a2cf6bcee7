"""io.tables.read_table: the one reader of the user's CSV tables (image,mask,phrase[,slices]; LabelValue,Name)."""

import pytest

from CLIPSegLib.errors import InputError
from CLIPSegLib.io.tables import read_table


def _table(folder, text, encoding="utf-8"):
    (folder / "a.nrrd").write_bytes(b"")
    (folder / "m.nrrd").write_bytes(b"")
    path = folder / "table.csv"
    path.write_text(text, encoding=encoding)
    return path


def test_rows_with_bom_spaces_lines_and_paths_resolved_against_the_csv_folder(tmp_path):
    sub = tmp_path / "data"
    sub.mkdir()
    path = _table(sub, "image , mask,phrase,slices\n a.nrrd ,m.nrrd,  thyroid nodule ,\n,,,\n"
                       "a.nrrd,m.nrrd,\"cyst, upper pole\",3;4\n", encoding="utf-8-sig")
    rows = read_table(path, optional=("slices",), files=("image", "mask"))
    assert [r.line for r in rows] == [2, 4]  # the blank ",,," line is skipped, not refused
    assert rows[0].path("image") == sub / "a.nrrd" and rows[0]["phrase"] == "thyroid nodule"
    assert rows[0].get("slices") is None and rows[1]["slices"] == "3;4" and rows[1]["phrase"] == "cyst, upper pole"
    assert rows[1].where == f"{path} line 4"


@pytest.mark.parametrize("text, message", [
    ("", "is empty; it needs a header row with columns image,mask,phrase"),
    ("image,phrase\na.nrrd,cyst\n", "the header image,phrase lacks the column mask; the table needs columns "
                                    "image,mask,phrase"),
    ("image\na.nrrd\n", "lacks the columns mask, phrase"),
    ("image,mask,phrase\n", "has a header but no rows"),
    ("image,mask,phrase,image\na.nrrd,m.nrrd,cyst,a.nrrd\n", "names the column image more than once"),
    ("image,mask,phrase\na.nrrd,m.nrrd,\n", "line 2: the phrase cell is empty; name the finding"),
    ("image,mask,phrase\na.nrrd,m.nrrd,cyst\n,m.nrrd,cyst\n", "line 3: the image cell is empty"),
    ("image,mask,phrase\na.nrrd,m.nrrd,cyst,left lobe\n", "line 2 has 4 cells but the header has 3 columns; put a "
                                                          "cell that holds a comma in double quotes"),
    ("image,mask,phrase\na.nrrd,gone.nrrd,cyst\n", "line 2: mask "),
])
def test_bad_tables_are_refused_naming_the_problem(tmp_path, text, message):
    with pytest.raises(InputError) as e:
        read_table(_table(tmp_path, text), files=("image", "mask"))
    assert message in str(e.value)
    if "gone" in text:
        assert str(tmp_path / "gone.nrrd") in str(e.value) and "does not exist" in str(e.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(InputError, match="--data nowhere.csv: no such file; give a CSV with columns "
                                         r"image,mask,phrase,\[slices\]"):
        read_table(tmp_path / "nowhere.csv", optional=("slices",), name="--data nowhere.csv")
    path = _table(tmp_path, "image,mask,phrase\na.nrrd,m.nrrd,nódulo\n", encoding="latin-1")
    with pytest.raises(InputError, match="is not UTF-8 text.*save it as \"CSV UTF-8\""):
        read_table(path)


def test_label_table_with_a_bad_value_names_its_line(tmp_path):
    from CLIPSegLib.io.outputs import read_label_names

    (tmp_path / "seg.labels.csv").write_text("LabelValue,Name\n1,cyst\none,nodule\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 3: LabelValue 'one' is not a whole number"):
        read_label_names(tmp_path / "seg.labels.csv")


def test_every_table_reader_refuses_an_empty_phrase_with_its_line(tmp_path):
    from CLIPSegLib.evaluation.evaluator import load_cases
    from CLIPSegLib.training.calibration import data_cases
    from CLIPSegLib.training.cliptnseg_recipe import check_train_args
    from CLIPSegLib.training.datasets import FolderTriples
    from CLIPSegLib.training.labelled_slices import read_data

    path = _table(tmp_path, "image,mask,phrase\na.nrrd,m.nrrd,cyst\na.nrrd,m.nrrd, \n")
    for read in (load_cases, data_cases, lambda p: FolderTriples(p, 32), read_data,
                 lambda p: check_train_args(["clip"], {}, {"--data": p})):
        with pytest.raises(InputError, match="line 3: the phrase cell is empty"):
            read(path)


def test_evaluation_table_refuses_a_phrase_given_twice_for_one_image(tmp_path):
    from CLIPSegLib.evaluation.evaluator import load_cases

    path = _table(tmp_path, "image,mask,phrase\na.nrrd,m.nrrd,cyst\n./a.nrrd,m.nrrd,cyst\n")
    with pytest.raises(InputError, match="line 3: 'cyst' is given twice for ./a.nrrd; merge the two masks"):
        load_cases(path)
