"""The Colab notebook runs top to bottom (nbclient) on the tiny model, its parameter cell set as CI would."""
import os
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "vipllava_visual_prompts.ipynb"


def test_inference_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    # The kernel imports this checkout's package even when it is not pip-installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    params[0].source += "\nTINY = True\nMAX_NEW_TOKENS = 8\n"  # what papermill-style injection does
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "What is the object within the red rectangle?" in text
    assert "What is pointed to by the blue arrow? ->" in text
    pngs = [o for o in outputs if o.output_type in ("execute_result", "display_data") and "image/png" in o.data]
    assert len(pngs) >= 2  # the image, then the marked image
