"""Ingest click logs into leak-free training examples.

  python -m jobs.ingest --config configs/tiny.yaml --source simulator --output data/processed/tiny
  python -m jobs.ingest --source movielens --output data/processed/ml100k
  python -m jobs.ingest --source taobao --input UserBehavior.csv --output data/processed/taobao
  python -m jobs.ingest --source parquet --input DIR --set data.column_map.user_id=uid ...

Sources: simulator | movielens (100k, fetched by `make movielens`) | movielens1m (DIR with
ratings.dat, movies.dat, users.dat) | taobao (UserBehavior.csv) | parquet (DIR with events.* and
optional items.* / users.*). Ends with a one-screen summary; stats.json has the details.
"""

from __future__ import annotations

import json
import sys
import time

from jobs.common import config_parser, init_ray, load


def summary(stats: dict, out: str, seconds: float) -> str:
    rows = [
        f"ingest: {stats['source']} -> {out}  ({seconds:.1f}s)",
        f"  events in        {stats['input_rows']['events']:>12,}",
        f"  accepted         {stats['accepted_events']:>12,}",
        f"  rejected         {stats['rejected_events']:>12,}  (kept in {out}/rejects/)",
    ]
    rows += [f"    {k:<24}{v:>10,}" for k, v in stats["rejects_by_reason"].items()]
    rows.append(f"  {'split':<8}{'ranking rows':>14}{'clicks':>10}{'pos. rate':>11}")
    for s, v in stats["splits"].items():
        rows.append(f"  {s:<8}{v['ranking_rows']:>14,}{v['retrieval_rows']:>10,}{v['positive_rate']:>11.4f}")
    q = stats.get("seq_len_long_quantiles", {})
    rows.append("  history length p10/p50/p90/p99: " + " / ".join(f"{v:.0f}" for v in q.values()))
    rows.append(f"  users {stats['users']:,}  items {stats['items']:,}  negatives: "
                f"{'logged impressions' if stats['has_impressions'] else 'sampled'}  fingerprint {stats['fingerprint']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = config_parser(__doc__)
    p.add_argument("--source", choices=["simulator", "movielens", "movielens1m", "taobao", "parquet"])
    p.add_argument("--input", help="input file or folder for file sources")
    p.add_argument("--output", help="output folder (default: data.output of the config; data/processed/<source> "
                                    "for a file source)")
    p.add_argument("--json", action="store_true", help="print stats.json instead of the summary")
    args = p.parse_args(argv)
    over = list(args.overrides)
    if args.source:
        over.append(f"data.source={args.source}")
    if args.input:
        over.append(f"data.input={args.input}")
    if args.output:
        over.append(f"data.output={args.output}")
    elif args.source and args.source != "simulator":
        over.append(f"data.output=data/processed/{args.source}")  # never over the simulator's folder
    args.overrides = over
    cfg = load(args)
    from pipeline.ingest import run_ingest

    init_ray()
    t0 = time.time()
    stats = run_ingest(cfg)
    print(json.dumps(stats) if args.json else summary(stats, cfg.data.output, time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
