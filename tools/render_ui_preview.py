"""Render CLIPSeg.ui to Resources/Screenshot.png without Slicer (a layout preview, not a live panel).

Slicer's custom widgets are replaced by the closest plain Qt widgets (ctkCollapsibleButton -> QGroupBox,
qMRMLNodeComboBox -> QComboBox with a sample entry, ctkSliderWidget -> QDoubleSpinBox), the combo boxes get the
choices the parameter node gives them, and the form is grabbed offscreen.
Run with any Python that has PySide6:  QT_QPA_PLATFORM=offscreen python tools/render_ui_preview.py
"""

import os
import re
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "CLIPSeg" / "Resources" / "UI" / "CLIPSeg.ui"
OUT = ROOT / "Resources" / "Screenshot.png"

SUBSTITUTES = {"ctkCollapsibleButton": "QGroupBox", "qMRMLNodeComboBox": "QComboBox", "ctkSliderWidget":
               "QDoubleSpinBox", "qMRMLWidget": "QWidget"}


def main():
    from PySide6.QtCore import QBuffer, QByteArray
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QComboBox, QLabel, QTextEdit

    text = UI.read_text(encoding="utf-8")
    text = re.sub(r"<customwidgets>.*</customwidgets>", "", text, flags=re.S)
    text = re.sub(r"<connections>.*</connections>", "", text, flags=re.S)
    # collapsible buttons show their text as a group box title
    text = re.sub(r'(class="ctkCollapsibleButton" name="\w+">\s*<property name=")text"', r'\1title"', text)
    for custom, plain in SUBSTITUTES.items():
        text = text.replace(f'class="{custom}"', f'class="{plain}"')
    text = re.sub(r'<property name="(nodeTypes|showChildNodeTypes|addEnabled|removeEnabled|noneEnabled|noneDisplay|'
                  r'renameEnabled|collapsed)".*?</property>', "", text, flags=re.S)
    app = QApplication.instance() or QApplication(sys.argv)
    data = QByteArray(text.encode())
    buf = QBuffer(data)
    buf.open(QBuffer.ReadOnly)
    loader = QUiLoader()
    form = loader.load(buf)
    if form is None:
        raise SystemExit(f"could not load {UI}: {loader.errorString()}")
    fill = {"inputVolumeSelector": ["thyroid US (256x256x32)"],
            "outputSegmentationSelector": ["Create new segmentation"],
            "modelComboBox": ["cliptnseg-phantom-ab-small (CLIP-TNseg, embedded)"],
            "deviceComboBox": ["auto", "cpu", "cuda"],
            "precisionComboBox": ["fp32", "bf16"],
            "axisComboBox": ["auto", "0", "1", "2"]}
    for name, items in fill.items():
        form.findChild(QComboBox, name).addItems(items)
    form.findChild(QTextEdit, "promptsTextEdit").setPlainText("hypoechoic thyroid nodule\nanechoic cyst")
    form.findChild(QLabel, "deviceInfoLabel").setText("No CUDA GPU found: CPU will be used")
    form.findChild(QLabel, "statusLabel").setText("'hypoechoic thyroid nodule': found (1 region(s))\n"
                                                  "'anechoic cyst': found (1 region(s))")
    from PySide6.QtWidgets import QDoubleSpinBox

    form.findChild(QDoubleSpinBox, "thresholdSliderWidget").setValue(0.5)
    form.resize(420, 630)
    form.show()
    app.processEvents()
    OUT.parent.mkdir(exist_ok=True)
    form.grab().save(str(OUT))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
