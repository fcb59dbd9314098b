"""Promotion by registry aliases (the policy: abtest/promotion.py): `challenger` becomes `champion`
only on a significant positive A/B lift.

  python -m jobs.promote --config configs/small.yaml [--abtest runs/abtest/last.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jobs.common import config_parser, load


def main(argv: list[str] | None = None) -> int:
    p = config_parser(__doc__)
    p.add_argument("--abtest", default="runs/abtest/last.json", help="the A/B result (jobs.abtest writes it)")
    args = p.parse_args(argv)
    cfg = load(args)
    path = Path(args.abtest)
    if not path.exists():
        p.error(f"{path}: no A/B result; run `python -m jobs.abtest` first")
    from abtest.promotion import promote

    print(json.dumps(promote(cfg, json.loads(path.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
