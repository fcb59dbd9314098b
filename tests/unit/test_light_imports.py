"""What a Ray Data worker of the ingest imports must not pull in torch: each worker paid about
1.5 s and 300 MB for it (benchmarks/RESULTS.md, "Ingest")."""

import subprocess
import sys

DATA_WORKER_MODULES = [
    "configs", "pipeline.ingest", "pipeline.partials", "pipeline.outputs", "pipeline.examples", "pipeline.catalog",
    "pipeline.validate", "pipeline.readers", "pipeline.simulator", "pipeline.world", "models.spec",
    "models.configs",
]


def test_data_worker_modules_do_not_import_torch():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in DATA_WORKER_MODULES)
            + "from configs import load_config\nload_config('configs/small.yaml')\n"
            + "print(sorted(m for m in ('torch', 'mlflow', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_models_package_still_exports_the_registry():
    from models import RANKING, TwoTowerConfig, build_model
    from models.dcnv2 import DCNv2Config

    assert "dcnv2" in RANKING and callable(build_model)
    assert RANKING["dcnv2"].Config is DCNv2Config and TwoTowerConfig.__module__ == "models.configs"
