"""Write what a phantom model was trained on into its spec: ``domain`` (what its training images look like) and
``training.phrases`` (its vocabulary).

    .venv/bin/python tools/describe_training_data.py CLIPSeg/Resources/Models/cliptnseg-phantom-small.json

Training writes both at export (``training.cliptnseg_recipe.run_training``); this tool adds them to a spec exported before they
existed, without touching the weights (their SHA-256 stays as listed). Deterministic: phantom seeds only.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CLIPSeg"))

from CLIPSegLib.inference.domain import phantom_domain  # noqa: E402
from CLIPSegLib.training.cliptnseg_recipe import training_phrases  # noqa: E402


def main(path: str) -> None:
    spec_path = Path(path)
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    spec["domain"] = phantom_domain(spec["clip"]["vision_cfg"]["image_size"],
                                    (spec.get("preprocessing") or {}).get("fit", "squash"),
                                    (spec.get("training") or {}).get("family", "A"))
    spec.setdefault("training", {})["phrases"] = training_phrases(spec["training"].get("data_csv"))
    tmp = spec_path.with_name(f".{spec_path.name}.partial")
    tmp.write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(spec_path)
    print(json.dumps(spec["domain"], indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
